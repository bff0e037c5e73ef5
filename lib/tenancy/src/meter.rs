//! The meters usage is counted in, named once for the database, the API and metrics.

/// What is counted. Time meters count milliseconds of signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Meter {
    /// Frames ingest accepted.
    Frames,
    /// Bytes of those frames as written to `eeg.frames` (the encoded record, whatever
    /// the wire format they arrived in).
    Bytes,
    /// Milliseconds of EEG streamed per session (samples per channel over the rate).
    DeviceMs,
    /// Device time times channels.
    ChannelMs,
    /// Channel time in windows Albi found usable (`clisonix-metering`'s clean rule).
    CleanChannelMs,
    /// Channel-windows of features computed.
    FeatureWindows,
    /// Milliseconds of audio rendered (per preset in the session's usage).
    AudioMs,
    /// Requests on the results API.
    ApiRequests,
    /// Recordings uploaded.
    RecordingUploads,
}

impl Meter {
    pub const ALL: [Meter; 9] = [
        Meter::Frames,
        Meter::Bytes,
        Meter::DeviceMs,
        Meter::ChannelMs,
        Meter::CleanChannelMs,
        Meter::FeatureWindows,
        Meter::AudioMs,
        Meter::ApiRequests,
        Meter::RecordingUploads,
    ];

    /// The meter's name in the database, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Frames => "frames",
            Meter::Bytes => "bytes",
            Meter::DeviceMs => "device_ms",
            Meter::ChannelMs => "channel_ms",
            Meter::CleanChannelMs => "clean_channel_ms",
            Meter::FeatureWindows => "feature_windows",
            Meter::AudioMs => "audio_ms",
            Meter::ApiRequests => "api_requests",
            Meter::RecordingUploads => "recording_uploads",
        }
    }

    pub fn parse(s: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// The unit of a quantity.
    pub fn unit(self) -> &'static str {
        match self {
            Meter::Frames => "frames",
            Meter::Bytes => "bytes",
            Meter::DeviceMs | Meter::ChannelMs | Meter::CleanChannelMs | Meter::AudioMs => {
                "milliseconds"
            }
            Meter::FeatureWindows => "channel-windows",
            Meter::ApiRequests => "requests",
            Meter::RecordingUploads => "recordings",
        }
    }
}

impl std::fmt::Display for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_have_one_name_each() {
        for m in Meter::ALL {
            assert_eq!(Meter::parse(m.as_str()), Some(m));
        }
        assert_eq!(Meter::parse("Frames"), None);
    }
}
