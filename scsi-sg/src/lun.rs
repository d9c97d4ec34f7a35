//! [`ScsiDevice`]: a probed logical unit with typed commands, over any
//! [`ScsiTransport`].

use std::path::Path;
use std::time::Duration;

use tracing::{debug, info};

use crate::cdb::{self, Command};
use crate::sense::SenseKey;
use crate::tpc::{
    BlockRange, CopyOperatingParameters, CopyStatusLid1, CscdId, ExtendedCopy, PopulateToken,
    RodToken, RodTokenInformation, Segment, WriteUsingToken,
};
use crate::vpd::{self, BlockLimits, Designator, Provisioning, RodLimits, ThirdPartyCopy};
use crate::{
    Capacity16, DEFAULT_TIMEOUT, DataTransfer, Error, InquiryData, ParseError, ScsiTransport,
    SgDevice, TokenProblem,
};

/// ROD-token support as probed from VPD page 0x8F.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RodSupport {
    /// The Block Device ROD Limits descriptor.
    pub limits: RodLimits,
}

/// Third-party copy capabilities of a logical unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyCapabilities {
    /// EXTENDED COPY(LID1) with block-to-block segments and NAA
    /// identification descriptors, with the copy manager's limits.
    pub extended_copy: Option<CopyOperatingParameters>,
    /// POPULATE TOKEN / WRITE USING TOKEN.
    pub rod_tokens: Option<RodSupport>,
}

impl CopyCapabilities {
    /// Whether the LUN offers any third-party copy this crate can drive.
    pub fn any(&self) -> bool {
        self.extended_copy.is_some() || self.rod_tokens.is_some()
    }
}

/// What the probe learned about a logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Standard INQUIRY data.
    pub inquiry: InquiryData,
    /// VPD pages the device lists on page 0x00.
    pub vpd_pages: Vec<u8>,
    /// Unit serial number (VPD 0x80), if offered.
    pub serial: Option<String>,
    /// Designators of VPD 0x83.
    pub designators: Vec<Designator>,
    /// READ CAPACITY(16) data.
    pub capacity: Capacity16,
    /// Block limits (VPD 0xB0), if offered.
    pub block_limits: Option<BlockLimits>,
    /// Logical block provisioning (VPD 0xB2), if offered.
    pub provisioning: Option<Provisioning>,
    /// Third-party copy.
    pub copy: CopyCapabilities,
}

impl Identity {
    /// The binary NAA designator of the logical unit (what EXTENDED COPY
    /// names it by), the longest if there are several.
    pub fn naa(&self) -> Option<&[u8]> {
        self.designators
            .iter()
            .filter(|d| d.is_lu_naa())
            .max_by_key(|d| d.designator.len())
            .map(|d| d.designator.as_slice())
    }
}

/// A probed SCSI direct-access logical unit over a transport.
#[derive(Debug)]
pub struct ScsiDevice<T: ScsiTransport> {
    transport: T,
    identity: Identity,
    timeout: Duration,
}

impl ScsiDevice<SgDevice> {
    /// Open `/dev/sgN` or `/dev/sdX` and probe it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        ScsiDevice::probe(SgDevice::open(path)?)
    }
}

fn parse_err(path: &Path, command: Command, source: ParseError) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        command,
        source,
    }
}

impl<T: ScsiTransport> ScsiDevice<T> {
    /// Probe the logical unit behind `transport`: standard INQUIRY (must be
    /// a connected direct-access device), READ CAPACITY(16), the VPD pages
    /// it lists (0x80, 0x83, 0xB0, 0xB2, 0x8F), RECEIVE COPY OPERATING
    /// PARAMETERS when INQUIRY sets 3PC. Each command is retried once after
    /// a UNIT ATTENTION. No ROD-token command is sent: token support is
    /// read from VPD 0x8F only.
    pub fn probe(transport: T) -> Result<Self, Error> {
        let timeout = DEFAULT_TIMEOUT;
        let path = transport.path().to_path_buf();
        let inquiry = {
            let c = cdb::inquiry(false, 0, cdb::STANDARD_INQUIRY_LEN);
            let mut buf = [0u8; cdb::STANDARD_INQUIRY_LEN as usize];
            let o = transport.execute_checked_retrying_unit_attention(
                &c,
                DataTransfer::FromDevice(&mut buf),
                timeout,
            )?;
            InquiryData::parse(buf.get(..o.transferred()).unwrap_or(&[]))
                .map_err(|e| parse_err(&path, o.command, e))?
        };
        if inquiry.peripheral_qualifier != 0 || inquiry.peripheral_device_type != 0 {
            return Err(Error::NotDirectAccess {
                path,
                peripheral_qualifier: inquiry.peripheral_qualifier,
                device_type: inquiry.peripheral_device_type,
            });
        }
        let capacity = {
            let c = cdb::read_capacity16(cdb::READ_CAPACITY_16_LEN);
            let mut buf = [0u8; Capacity16::LEN];
            let o = transport.execute_checked_retrying_unit_attention(
                &c,
                DataTransfer::FromDevice(&mut buf),
                timeout,
            )?;
            Capacity16::parse(buf.get(..o.transferred()).unwrap_or(&[]))
                .map_err(|e| parse_err(&path, o.command, e))?
        };
        let vpd_pages = match vpd_page(&transport, vpd::PAGE_SUPPORTED, timeout) {
            Ok(bytes) => vpd::parse_supported_pages(&bytes)
                .map_err(|e| parse_err(&path, Command::new(cdb::INQUIRY), e))?,
            Err(e) if is_illegal_request(&e) => Vec::new(),
            Err(e) => return Err(e),
        };
        let inq = Command::new(cdb::INQUIRY);
        let has = |p: u8| vpd_pages.contains(&p);
        let serial = if has(vpd::PAGE_UNIT_SERIAL) {
            let b = vpd_page(&transport, vpd::PAGE_UNIT_SERIAL, timeout)?;
            Some(vpd::parse_unit_serial(&b).map_err(|e| parse_err(&path, inq, e))?)
        } else {
            None
        };
        let designators = if has(vpd::PAGE_DEVICE_IDENTIFICATION) {
            let b = vpd_page(&transport, vpd::PAGE_DEVICE_IDENTIFICATION, timeout)?;
            vpd::parse_device_identification(&b).map_err(|e| parse_err(&path, inq, e))?
        } else {
            Vec::new()
        };
        let block_limits = if has(vpd::PAGE_BLOCK_LIMITS) {
            let b = vpd_page(&transport, vpd::PAGE_BLOCK_LIMITS, timeout)?;
            Some(BlockLimits::parse(&b).map_err(|e| parse_err(&path, inq, e))?)
        } else {
            None
        };
        let provisioning = if has(vpd::PAGE_LOGICAL_BLOCK_PROVISIONING) {
            let b = vpd_page(&transport, vpd::PAGE_LOGICAL_BLOCK_PROVISIONING, timeout)?;
            Some(Provisioning::parse(&b).map_err(|e| parse_err(&path, inq, e))?)
        } else {
            None
        };
        let mut copy = CopyCapabilities::default();
        if inquiry.third_party_copy {
            let c = cdb::receive_copy_operating_parameters(cdb::RCOP_ALLOC_LEN);
            let mut buf = [0u8; cdb::RCOP_ALLOC_LEN as usize];
            match transport.execute_checked_retrying_unit_attention(
                &c,
                DataTransfer::FromDevice(&mut buf),
                timeout,
            ) {
                Ok(o) => {
                    let p =
                        CopyOperatingParameters::parse(buf.get(..o.transferred()).unwrap_or(&[]))
                            .map_err(|e| parse_err(&path, o.command, e))?;
                    if p.supports_block_to_block_naa() && p.max_segment_descriptors > 0 {
                        copy.extended_copy = Some(p);
                    }
                }
                Err(e) if is_illegal_request(&e) => {
                    debug!(path = %path.display(), error = %e, "no EXTENDED COPY operating parameters");
                }
                Err(e) => return Err(e),
            }
            if has(vpd::PAGE_THIRD_PARTY_COPY) {
                let b = vpd_page(&transport, vpd::PAGE_THIRD_PARTY_COPY, timeout)?;
                let t = ThirdPartyCopy::parse(&b).map_err(|e| parse_err(&path, inq, e))?;
                let tokens = t.supports(cdb::THIRD_PARTY_COPY_OUT, cdb::TPC_OUT_POPULATE_TOKEN)
                    && t.supports(cdb::THIRD_PARTY_COPY_OUT, cdb::TPC_OUT_WRITE_USING_TOKEN)
                    && t.supports(
                        cdb::THIRD_PARTY_COPY_IN,
                        cdb::TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION,
                    );
                if let (true, Some(limits)) = (tokens, t.rod_limits) {
                    copy.rod_tokens = Some(RodSupport { limits });
                }
            }
        }
        let identity = Identity {
            inquiry,
            vpd_pages,
            serial,
            designators,
            capacity,
            block_limits,
            provisioning,
            copy,
        };
        info!(
            path = %path.display(),
            vendor = %identity.inquiry.vendor,
            product = %identity.inquiry.product,
            blocks = ?identity.capacity.block_count(),
            block_len = identity.capacity.logical_block_length,
            xcopy = identity.copy.extended_copy.is_some(),
            rod_tokens = identity.copy.rod_tokens.is_some(),
            "probed SCSI LUN"
        );
        Ok(ScsiDevice {
            transport,
            identity,
            timeout,
        })
    }

    /// What the probe found.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Give the transport back.
    pub fn into_transport(self) -> T {
        self.transport
    }

    /// The device's name in errors.
    pub fn path(&self) -> &Path {
        self.transport.path()
    }

    /// Logical block length in bytes.
    pub fn block_len(&self) -> u32 {
        self.identity.capacity.logical_block_length
    }

    /// Number of logical blocks.
    pub fn block_count(&self) -> u64 {
        self.identity.capacity.block_count().unwrap_or(u64::MAX)
    }

    /// Timeout for the typed commands.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn invalid(&self, command: Command, lba: u64, blocks: u64, reason: &'static str) -> Error {
        Error::InvalidRequest {
            path: self.path().to_path_buf(),
            command,
            lba,
            blocks,
            reason,
        }
    }

    /// Checks `lba + blocks` lies within the capacity and `blocks` fits 32
    /// bits.
    fn check_range(&self, command: Command, lba: u64, blocks: u64) -> Result<u32, Error> {
        let end = lba
            .checked_add(blocks)
            .ok_or_else(|| self.invalid(command, lba, blocks, "range overflows"))?;
        if end > self.block_count() {
            return Err(self.invalid(command, lba, blocks, "range past the end of the device"));
        }
        u32::try_from(blocks)
            .map_err(|_| self.invalid(command, lba, blocks, "more blocks than one command carries"))
    }

    fn blocks_of(&self, command: Command, lba: u64, len: usize) -> Result<u64, Error> {
        let bl = usize::try_from(self.block_len())
            .unwrap_or(usize::MAX)
            .max(1);
        if !len.is_multiple_of(bl) {
            return Err(self.invalid(command, lba, 0, "buffer is not a whole number of blocks"));
        }
        u64::try_from(len / bl).map_err(|_| self.invalid(command, lba, 0, "buffer too large"))
    }

    /// READ(16) of `buf.len()` bytes (whole blocks) from `lba`.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), Error> {
        let command = Command::new(cdb::READ_16);
        let blocks = self.blocks_of(command, lba, buf.len())?;
        let n = self.check_range(command, lba, blocks)?;
        let o = self.transport.execute_checked(
            &cdb::read16(lba, n, false),
            DataTransfer::FromDevice(buf),
            self.timeout,
        )?;
        if o.transferred() != o.requested() {
            return Err(self.invalid(
                command,
                lba,
                blocks,
                "device returned fewer bytes than asked",
            ));
        }
        Ok(())
    }

    /// WRITE(16) of `buf` (whole blocks) at `lba`, with FUA if asked.
    pub fn write(&self, lba: u64, buf: &[u8], fua: bool) -> Result<(), Error> {
        let command = Command::new(cdb::WRITE_16);
        let blocks = self.blocks_of(command, lba, buf.len())?;
        let n = self.check_range(command, lba, blocks)?;
        self.transport.execute_checked(
            &cdb::write16(lba, n, fua),
            DataTransfer::ToDevice(buf),
            self.timeout,
        )?;
        Ok(())
    }

    /// SYNCHRONIZE CACHE(16) of the whole medium.
    pub fn synchronize_cache(&self) -> Result<(), Error> {
        self.transport.execute_checked(
            &cdb::synchronize_cache16(0, 0),
            DataTransfer::None,
            self.timeout,
        )?;
        Ok(())
    }

    /// UNMAP the ranges `(lba, blocks)`.
    pub fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), Error> {
        let command = Command::new(cdb::UNMAP);
        if self.identity.provisioning.is_some_and(|p| !p.lbpu) {
            return Err(Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "UNMAP",
            });
        }
        for &(lba, blocks) in ranges {
            self.check_range(command, lba, u64::from(blocks))?;
        }
        let params = cdb::unmap_parameters(ranges)
            .ok_or_else(|| self.invalid(command, 0, 0, "too many ranges for one UNMAP"))?;
        let len = u16::try_from(params.len())
            .map_err(|_| self.invalid(command, 0, 0, "too many ranges for one UNMAP"))?;
        self.transport.execute_checked(
            &cdb::unmap(len),
            DataTransfer::ToDevice(&params),
            self.timeout,
        )?;
        Ok(())
    }

    /// WRITE SAME(16) of one block of `data` over `blocks` blocks from `lba`;
    /// with `unmap` the device may deallocate them (when `data` is zeros).
    pub fn write_same(&self, lba: u64, blocks: u32, data: &[u8], unmap: bool) -> Result<(), Error> {
        let command = Command::new(cdb::WRITE_SAME_16);
        self.check_range(command, lba, u64::from(blocks))?;
        if self.blocks_of(command, lba, data.len())? != 1 {
            return Err(self.invalid(
                command,
                lba,
                u64::from(blocks),
                "WRITE SAME takes one block of data",
            ));
        }
        self.transport.execute_checked(
            &cdb::write_same16(lba, blocks, unmap),
            DataTransfer::ToDevice(data),
            self.timeout,
        )?;
        Ok(())
    }

    /// REPORT LUNS: the 8-byte LUNs the target reports.
    pub fn report_luns(&self) -> Result<Vec<u64>, Error> {
        let mut buf = vec![0u8; 8 + 8 * 256];
        let alloc = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let o = self.transport.execute_checked(
            &cdb::report_luns(alloc),
            DataTransfer::FromDevice(&mut buf),
            self.timeout,
        )?;
        let got = buf.get(..o.transferred()).unwrap_or(&[]);
        parse_report_luns(got).map_err(|e| parse_err(self.path(), o.command, e))
    }

    /// Send one EXTENDED COPY(LID1) parameter list as is.
    pub fn extended_copy(&self, list: &ExtendedCopy) -> Result<(), Error> {
        let command = Command::with_service_action(cdb::THIRD_PARTY_COPY_OUT, 0);
        let params = list
            .to_bytes()
            .ok_or_else(|| self.invalid(command, 0, 0, "parameter list fields too wide"))?;
        let len = u32::try_from(params.len())
            .map_err(|_| self.invalid(command, 0, 0, "parameter list too long"))?;
        self.transport.execute_checked(
            &cdb::extended_copy_lid1(len),
            DataTransfer::ToDevice(&params),
            self.timeout,
        )?;
        Ok(())
    }

    /// Copy `blocks` blocks from `src_lba` of this LUN to `dst_lba` of
    /// `dest` with EXTENDED COPY(LID1), sent to this LUN's copy manager,
    /// split into as many commands as the copy manager's limits (segment
    /// length, 65535 blocks per segment, segments per list) require.
    /// Returns the number of commands sent.
    pub fn copy_to<U: ScsiTransport>(
        &self,
        src_lba: u64,
        dest: &ScsiDevice<U>,
        dst_lba: u64,
        blocks: u64,
    ) -> Result<usize, Error> {
        let command = Command::with_service_action(cdb::THIRD_PARTY_COPY_OUT, 0);
        let Some(params) = &self.identity.copy.extended_copy else {
            return Err(Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "EXTENDED COPY",
            });
        };
        let (Some(src_naa), Some(dst_naa)) = (self.identity.naa(), dest.identity.naa()) else {
            return Err(self.invalid(command, src_lba, blocks, "a LUN has no NAA designator"));
        };
        if self.block_len() != dest.block_len() {
            return Err(self.invalid(command, src_lba, blocks, "block sizes differ"));
        }
        if src_lba
            .checked_add(blocks)
            .is_none_or(|e| e > self.block_count())
            || dst_lba
                .checked_add(blocks)
                .is_none_or(|e| e > dest.block_count())
        {
            return Err(self.invalid(command, src_lba, blocks, "range past the end of the device"));
        }
        let bl = u64::from(self.block_len().max(1));
        let by_len = u64::from(params.max_segment_length) / bl;
        let mut per_segment = by_len.clamp(1, u64::from(u16::MAX));
        let per_list = usize::from(params.max_segment_descriptors.max(1));
        let same = src_naa == dst_naa;
        // Overlapping ranges on one LUN: a copy manager may move a segment
        // in pieces, front to back. Keep every segment shorter than the
        // distance between the ranges and, when the destination lies
        // above the source, go from the end (memmove order), so no block
        // is read after it has been overwritten.
        let distance = src_lba.abs_diff(dst_lba);
        let overlap = same && distance < blocks;
        if overlap && distance == 0 {
            return Ok(0);
        }
        if overlap {
            per_segment = per_segment.min(distance);
        }
        let backwards = overlap && dst_lba > src_lba;
        let cscds = if same {
            vec![CscdId {
                naa: src_naa.to_vec(),
                block_len: self.block_len(),
            }]
        } else {
            vec![
                CscdId {
                    naa: src_naa.to_vec(),
                    block_len: self.block_len(),
                },
                CscdId {
                    naa: dst_naa.to_vec(),
                    block_len: dest.block_len(),
                },
            ]
        };
        let mut done = 0u64;
        let mut commands = 0;
        while done < blocks {
            let mut segments = Vec::with_capacity(per_list);
            while segments.len() < per_list && done < blocks {
                let n = (blocks - done).min(per_segment);
                // Offset of this piece from the start of the ranges.
                let at = if backwards { blocks - done - n } else { done };
                segments.push(Segment {
                    source: 0,
                    destination: if same { 0 } else { 1 },
                    blocks: u16::try_from(n).unwrap_or(u16::MAX),
                    source_lba: src_lba + at,
                    destination_lba: dst_lba + at,
                });
                done += n;
            }
            self.extended_copy(&ExtendedCopy {
                list_id: 0,
                no_list_id: params.snlid,
                cscds: cscds.clone(),
                segments,
            })?;
            commands += 1;
        }
        Ok(commands)
    }

    /// RECEIVE COPY STATUS(LID1) for an EXTENDED COPY sent with
    /// `list_id` (and LIST ID USAGE other than "no list identifier").
    pub fn receive_copy_status(&self, list_id: u8) -> Result<CopyStatusLid1, Error> {
        let mut buf = [0u8; 12];
        let o = self.transport.execute_checked(
            &cdb::receive_copy_status_lid1(list_id, 12),
            DataTransfer::FromDevice(&mut buf),
            self.timeout,
        )?;
        CopyStatusLid1::parse(buf.get(..o.transferred()).unwrap_or(&[]))
            .map_err(|e| parse_err(self.path(), o.command, e))
    }

    fn require_tokens(&self) -> Result<&RodSupport, Error> {
        self.identity
            .copy
            .rod_tokens
            .as_ref()
            .ok_or_else(|| Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "ROD tokens (POPULATE TOKEN / WRITE USING TOKEN)",
            })
    }

    fn token_error(&self, e: Error) -> Error {
        match e {
            Error::CheckCondition {
                path,
                command,
                sense,
            } if sense.key == SenseKey::IllegalRequest => match TokenProblem::from_sense(&sense) {
                Some(problem) => Error::Token {
                    path,
                    command,
                    problem,
                    sense,
                },
                None => Error::CheckCondition {
                    path,
                    command,
                    sense,
                },
            },
            other => other,
        }
    }

    /// POPULATE TOKEN for `ranges` under `list_id`, then RECEIVE ROD TOKEN
    /// INFORMATION to fetch the token. `inactivity_timeout` 0 selects the
    /// device's default. Fails with [`Error::Unsupported`] (no command
    /// sent) when the probe found no ROD-token support.
    ///
    /// The token may represent fewer blocks than `ranges` hold: use
    /// [`ScsiDevice::populate_token_information`] to learn how many.
    pub fn populate_token(
        &self,
        list_id: u32,
        ranges: &[BlockRange],
        inactivity_timeout: u32,
    ) -> Result<RodToken, Error> {
        let info = self.populate_token_information(list_id, ranges, inactivity_timeout)?;
        info.token.ok_or_else(|| self.no_token_error())
    }

    /// POPULATE TOKEN for `ranges` under `list_id`, then the whole RECEIVE
    /// ROD TOKEN INFORMATION response for it: the token (checked present)
    /// and the TRANSFER COUNT, which says how many blocks, from the start
    /// of `ranges`, the token represents. A copy manager may represent
    /// fewer than asked; a target may keep the response for one read
    /// only, so this is the one place to learn the count.
    pub fn populate_token_information(
        &self,
        list_id: u32,
        ranges: &[BlockRange],
        inactivity_timeout: u32,
    ) -> Result<RodTokenInformation, Error> {
        let command = Command::with_service_action(cdb::THIRD_PARTY_COPY_OUT, 0x10);
        self.require_tokens()?;
        for r in ranges {
            self.check_range(command, r.lba, u64::from(r.blocks))?;
        }
        let params = PopulateToken {
            immed: false,
            rod_type: None,
            inactivity_timeout,
            ranges: ranges.to_vec(),
        }
        .to_bytes();
        self.send_token_parameters(command, &params, |len| cdb::populate_token(list_id, len))?;
        let info = self.receive_rod_token_information(list_id)?;
        if info.token.is_none() {
            return Err(self.no_token_error());
        }
        Ok(info)
    }

    fn no_token_error(&self) -> Error {
        parse_err(
            self.path(),
            Command::with_service_action(cdb::THIRD_PARTY_COPY_IN, 0x07),
            ParseError::Invalid {
                what: "ROD token information",
                reason: "no ROD token after POPULATE TOKEN",
            },
        )
    }

    /// RECEIVE ROD TOKEN INFORMATION for `list_id`.
    pub fn receive_rod_token_information(
        &self,
        list_id: u32,
    ) -> Result<RodTokenInformation, Error> {
        self.require_tokens()?;
        let mut buf = vec![0u8; cdb::RRTI_ALLOC_LEN as usize];
        let o = self
            .transport
            .execute_checked(
                &cdb::receive_rod_token_information(list_id, cdb::RRTI_ALLOC_LEN),
                DataTransfer::FromDevice(&mut buf),
                self.timeout,
            )
            .map_err(|e| self.token_error(e))?;
        RodTokenInformation::parse(buf.get(..o.transferred()).unwrap_or(&[]))
            .map_err(|e| parse_err(self.path(), o.command, e))
    }

    /// WRITE USING TOKEN: write `ranges` of this LUN from the token's data,
    /// starting `offset_into_rod` blocks into it. A token the copy manager
    /// no longer honours is [`Error::Token`] (expired, revoked because its
    /// source was written, deleted, unknown): nothing is written then.
    ///
    /// GOOD status does not mean every block was written: a copy manager
    /// may stop early (the ROD ran out, it chose to) and end GOOD. RECEIVE
    /// ROD TOKEN INFORMATION for `list_id` then tells how many blocks, from
    /// the start of `ranges`, it wrote; read it before taking the write as
    /// whole.
    pub fn write_using_token(
        &self,
        list_id: u32,
        token: &RodToken,
        offset_into_rod: u64,
        ranges: &[BlockRange],
        del_tkn: bool,
    ) -> Result<(), Error> {
        let command = Command::with_service_action(cdb::THIRD_PARTY_COPY_OUT, 0x11);
        self.require_tokens()?;
        for r in ranges {
            self.check_range(command, r.lba, u64::from(r.blocks))?;
        }
        let params = WriteUsingToken {
            immed: false,
            del_tkn,
            offset_into_rod,
            token: token.clone(),
            ranges: ranges.to_vec(),
        }
        .to_bytes();
        self.send_token_parameters(command, &params, |len| cdb::write_using_token(list_id, len))
    }

    /// Sends a token command's parameter list with the CDB `cdb` makes for
    /// its length.
    fn send_token_parameters(
        &self,
        command: Command,
        params: &[u8],
        cdb: impl FnOnce(u32) -> [u8; 16],
    ) -> Result<(), Error> {
        let len = u32::try_from(params.len())
            .map_err(|_| self.invalid(command, 0, 0, "too many ranges"))?;
        self.transport
            .execute_checked(&cdb(len), DataTransfer::ToDevice(params), self.timeout)
            .map_err(|e| self.token_error(e))?;
        Ok(())
    }
}

/// Fetch one VPD page, growing the allocation once if the page is longer
/// than the first guess.
pub fn vpd_page<T: ScsiTransport + ?Sized>(
    transport: &T,
    page: u8,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let mut alloc: u16 = 256;
    loop {
        let mut buf = vec![0u8; usize::from(alloc)];
        let o = transport.execute_checked_retrying_unit_attention(
            &cdb::inquiry_vpd(page, alloc),
            DataTransfer::FromDevice(&mut buf),
            timeout,
        )?;
        buf.truncate(o.transferred());
        let want = match buf.get(2..4) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])) + 4,
            _ => 0,
        };
        if want <= buf.len() || alloc == u16::MAX || o.transferred() < usize::from(alloc) {
            return Ok(buf);
        }
        alloc = u16::try_from(want).unwrap_or(u16::MAX);
    }
}

fn is_illegal_request(e: &Error) -> bool {
    e.sense().is_some_and(|s| s.key == SenseKey::IllegalRequest)
}

/// Parse REPORT LUNS parameter data: LUN LIST LENGTH, then 8-byte LUNs
/// (clamped to what was received).
pub fn parse_report_luns(bytes: &[u8]) -> Result<Vec<u64>, ParseError> {
    let h = bytes.get(..8).ok_or(ParseError::Truncated {
        what: "REPORT LUNS data",
        needed: 8,
        available: bytes.len(),
    })?;
    let len = usize::try_from(u32::from_be_bytes([h[0], h[1], h[2], h[3]])).unwrap_or(usize::MAX);
    if !len.is_multiple_of(8) {
        return Err(ParseError::Invalid {
            what: "REPORT LUNS data",
            reason: "LUN LIST LENGTH not a multiple of 8",
        });
    }
    let list = bytes.get(8..).unwrap_or(&[]);
    let list = list.get(..len.min(list.len())).unwrap_or(list);
    Ok(list
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}
