//! The clean channel-time rule: which channel-windows count as usable signal.
//!
//! A window is clean when Albi's quality figures for it say the channel was recording
//! EEG rather than nothing, a rail or the mains: not flat, at most 1% of its samples
//! on a plateau at its extremes (clipping), and the PSD at 50 Hz and at 60 Hz each at
//! most 25 dB (a ratio of 316) above the median of the bins within 10 Hz of it (line
//! noise; a line above the window's Nyquist frequency is not measured and does not
//! count against it). Mains pickup of a few dB is in most real recordings and is
//! notched out in analysis; a line 25 dB over its surroundings is one the electrode
//! picks up more than the brain (on the reference recording, one window in twelve).
//!
//! Each clean window counts the channel time it adds beyond the window before it
//! ([`owned_samples`]): the whole window for the first, the hop for later ones, so
//! overlapping windows never count a sample twice. The rule is versioned
//! ([`CleanRule::version`]); a change is a new version, and since every figure it reads
//! is stored with the features (`features.flat`, `clipped_fraction`,
//! `line_noise_50hz`, `line_noise_60hz`), a session's clean time can be recomputed
//! from its features under any version (`docs/metering.md` has the query).

use clisonix_schemas::WindowQuality;

/// A version of the rule and its thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CleanRule {
    pub version: &'static str,
    /// Most samples on a plateau at the window's extremes, as a fraction.
    pub max_clipped_fraction: f64,
    /// Largest PSD at 50 Hz and 60 Hz over the neighbouring bins' median, in dB.
    pub max_line_noise_db: f64,
}

/// The rule in force.
pub const CLEAN_RULE: CleanRule = CleanRule {
    version: "clean-v1",
    max_clipped_fraction: 0.01,
    max_line_noise_db: 25.0,
};

impl CleanRule {
    pub fn is_clean(&self, q: &WindowQuality) -> bool {
        let line_ok =
            |ratio: Option<f64>| ratio.is_none_or(|r| 10.0 * r.log10() <= self.max_line_noise_db);
        !q.flat
            && q.clipped_fraction <= self.max_clipped_fraction
            && line_ok(q.line_noise_50hz)
            && line_ok(q.line_noise_60hz)
    }
}

/// The samples a window adds beyond the previous one: all of window 0, then the hop
/// (window starts are `index * hop` samples from the session's first), never more than
/// the window itself (a hop longer than the window leaves samples in no window).
pub fn owned_samples(window_index: u64, window_start_sample: u64, window_samples: u32) -> u64 {
    let window = u64::from(window_samples);
    window_start_sample
        .checked_div(window_index)
        .map_or(window, |hop| hop.min(window))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quality() -> WindowQuality {
        WindowQuality {
            flat: false,
            clipped_fraction: 0.0,
            line_noise_50hz: Some(1.2),
            line_noise_60hz: Some(0.9),
            seq_gaps: 0,
            duplicate_frames: 0,
            out_of_order_frames: 0,
        }
    }

    #[test]
    fn each_threshold_alone_makes_a_window_unclean() {
        let rule = CLEAN_RULE;
        assert!(rule.is_clean(&quality()));
        assert!(!rule.is_clean(&WindowQuality {
            flat: true,
            ..quality()
        }));
        assert!(rule.is_clean(&WindowQuality {
            clipped_fraction: 0.01,
            ..quality()
        }));
        assert!(!rule.is_clean(&WindowQuality {
            clipped_fraction: 0.011,
            ..quality()
        }));
        assert!(rule.is_clean(&WindowQuality {
            line_noise_50hz: Some(316.0),
            ..quality()
        }));
        assert!(!rule.is_clean(&WindowQuality {
            line_noise_50hz: Some(317.0),
            ..quality()
        }));
        assert!(!rule.is_clean(&WindowQuality {
            line_noise_60hz: Some(1000.0),
            ..quality()
        }));
        assert!(
            rule.is_clean(&WindowQuality {
                line_noise_50hz: None,
                line_noise_60hz: None,
                ..quality()
            }),
            "a line above Nyquist is not measured"
        );
    }

    #[test]
    fn overlapping_windows_count_each_sample_once() {
        // 2 s windows every 0.5 s at 128 Hz: 256, then 64 per window.
        assert_eq!(owned_samples(0, 0, 256), 256);
        assert_eq!(owned_samples(1, 64, 256), 64);
        assert_eq!(owned_samples(9, 576, 256), 64);
        // Back to back.
        assert_eq!(owned_samples(3, 768, 256), 256);
        // Windows with gaps between them count the window only.
        assert_eq!(owned_samples(2, 1024, 256), 256);
    }
}
