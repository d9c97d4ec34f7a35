//! Victim selection.

use std::fmt;
use std::str::FromStr;

/// How the cleaner picks victim segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Policy {
    /// The segments with the fewest live blocks: the least to copy per
    /// segment freed.
    #[default]
    Greedy,
    /// The segments with the best `(1 - u) * age / (1 + u)` (Rosenblum and
    /// Ousterhout's LFS): cold segments are cleaned at a higher
    /// utilisation than hot ones, whose blocks would soon die anyway.
    CostBenefit,
}

impl Policy {
    /// The score to sort victims by, highest first: `live` of `slots` live
    /// blocks, `age` in writes since the segment's newest block.
    pub fn score(self, live: u32, slots: u32, age: u64) -> f64 {
        let u = f64::from(live) / f64::from(slots.max(1));
        match self {
            Policy::Greedy => 1.0 - u,
            Policy::CostBenefit => (1.0 - u) * (age as f64 + 1.0) / (1.0 + u),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Greedy => "greedy",
            Policy::CostBenefit => "cost-benefit",
        })
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "greedy" => Ok(Policy::Greedy),
            "cost-benefit" => Ok(Policy::CostBenefit),
            _ => Err(format!("`{s}`: the policies are greedy and cost-benefit")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_prefers_emptier_segments_whatever_their_age() {
        let g = Policy::Greedy;
        assert!(g.score(10, 100, 0) > g.score(20, 100, 1_000_000));
    }

    #[test]
    fn cost_benefit_cleans_cold_segments_fuller() {
        let cb = Policy::CostBenefit;
        // A cold segment 80 % full beats a hot one 60 % full.
        assert!(cb.score(80, 100, 100_000) > cb.score(60, 100, 1_000));
        // At equal age, the emptier one wins.
        assert!(cb.score(30, 100, 500) > cb.score(60, 100, 500));
        assert_eq!(cb.score(100, 100, 1_000_000), 0.0);
    }

    #[test]
    fn names_round_trip() {
        for p in [Policy::Greedy, Policy::CostBenefit] {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        assert!("lru".parse::<Policy>().is_err());
    }
}
