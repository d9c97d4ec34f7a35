//! SCSI status byte (SAM-5).

use std::fmt;

/// The SCSI status a device returned for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScsiStatus {
    /// 0x00: the command completed.
    Good,
    /// 0x02: sense data describes what went wrong.
    CheckCondition,
    /// 0x04: PRE-FETCH found the cache could hold the range.
    ConditionMet,
    /// 0x08: the logical unit is busy; retry later.
    Busy,
    /// 0x18: another initiator holds a conflicting reservation.
    ReservationConflict,
    /// 0x28: the task set is full; retry when a command completes.
    TaskSetFull,
    /// 0x30: an ACA condition exists.
    AcaActive,
    /// 0x40: aborted on behalf of another I_T nexus.
    TaskAborted,
    /// Any other (obsolete or reserved) status byte, kept as received.
    Other(u8),
}

impl ScsiStatus {
    /// Classify a status byte. Bits 0, 6 and 7 were vendor/reserved in
    /// SCSI-2; like sg3_utils we ignore bits 0 and 7 when classifying, and
    /// keep the raw byte in [`ScsiStatus::Other`].
    pub const fn from_byte(status: u8) -> Self {
        match status & 0x7e {
            0x00 => ScsiStatus::Good,
            0x02 => ScsiStatus::CheckCondition,
            0x04 => ScsiStatus::ConditionMet,
            0x08 => ScsiStatus::Busy,
            0x18 => ScsiStatus::ReservationConflict,
            0x28 => ScsiStatus::TaskSetFull,
            0x30 => ScsiStatus::AcaActive,
            0x40 => ScsiStatus::TaskAborted,
            _ => ScsiStatus::Other(status),
        }
    }

    /// The status byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            ScsiStatus::Good => 0x00,
            ScsiStatus::CheckCondition => 0x02,
            ScsiStatus::ConditionMet => 0x04,
            ScsiStatus::Busy => 0x08,
            ScsiStatus::ReservationConflict => 0x18,
            ScsiStatus::TaskSetFull => 0x28,
            ScsiStatus::AcaActive => 0x30,
            ScsiStatus::TaskAborted => 0x40,
            ScsiStatus::Other(b) => b,
        }
    }

    /// Name as SAM spells it, e.g. "CHECK CONDITION".
    pub const fn name(self) -> &'static str {
        match self {
            ScsiStatus::Good => "GOOD",
            ScsiStatus::CheckCondition => "CHECK CONDITION",
            ScsiStatus::ConditionMet => "CONDITION MET",
            ScsiStatus::Busy => "BUSY",
            ScsiStatus::ReservationConflict => "RESERVATION CONFLICT",
            ScsiStatus::TaskSetFull => "TASK SET FULL",
            ScsiStatus::AcaActive => "ACA ACTIVE",
            ScsiStatus::TaskAborted => "TASK ABORTED",
            ScsiStatus::Other(_) => "OTHER STATUS",
        }
    }

    /// GOOD or CONDITION MET: the command did what was asked.
    pub const fn is_success(self) -> bool {
        matches!(self, ScsiStatus::Good | ScsiStatus::ConditionMet)
    }
}

impl From<u8> for ScsiStatus {
    fn from(status: u8) -> Self {
        ScsiStatus::from_byte(status)
    }
}

impl fmt::Display for ScsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScsiStatus::Other(b) => write!(f, "status {b:#04x}"),
            s => f.write_str(s.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for b in [0x00, 0x02, 0x04, 0x08, 0x18, 0x28, 0x30, 0x40] {
            assert_eq!(ScsiStatus::from_byte(b).to_byte(), b);
            assert!(!matches!(ScsiStatus::from_byte(b), ScsiStatus::Other(_)));
        }
        assert_eq!(ScsiStatus::from_byte(0x22), ScsiStatus::Other(0x22));
        assert_eq!(ScsiStatus::from_byte(0x22).to_byte(), 0x22);
        assert_eq!(ScsiStatus::from(0x02).to_string(), "CHECK CONDITION");
    }
}
