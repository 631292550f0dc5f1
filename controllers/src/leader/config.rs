use std::time::Duration;

/// Timing and identity of one election. Defaults match kube-controller-manager's
/// `--leader-elect-*` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per running process: two processes sharing an identity would both renew.
    pub identity: String,
    /// How long followers wait, from when they saw the last renewal, before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal before it steps down.
    pub renew_deadline: Duration,
    /// How often candidates retry and the leader renews.
    pub retry_period: Duration,
}

pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// client-go requires the renew deadline to leave room for more than one retry, counting the
/// jitter it adds to retries; the same ratio keeps svcplane's replicas interchangeable with it.
const RETRY_JITTER_FACTOR: f64 = 1.2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("leader election identity must not be empty")]
    EmptyIdentity,
    #[error("lease name and namespace must not be empty")]
    EmptyLeaseName,
    #[error("lease duration must be a whole number of seconds, at least 1s (got {0:?})")]
    LeaseDurationNotWholeSeconds(Duration),
    #[error("lease duration ({lease:?}) must be greater than the renew deadline ({renew:?})")]
    LeaseNotLongerThanRenew { lease: Duration, renew: Duration },
    #[error("renew deadline ({renew:?}) must be greater than 1.2 x the retry period ({retry:?})")]
    RenewTooShortForRetry { renew: Duration, retry: Duration },
    #[error("retry period must be positive")]
    ZeroRetryPeriod,
}

impl ElectionConfig {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.identity.is_empty() {
            return Err(ConfigError::EmptyIdentity);
        }
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err(ConfigError::EmptyLeaseName);
        }
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.as_secs() == 0 {
            return Err(ConfigError::LeaseDurationNotWholeSeconds(self.lease_duration));
        }
        if self.retry_period.is_zero() {
            return Err(ConfigError::ZeroRetryPeriod);
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(ConfigError::LeaseNotLongerThanRenew {
                lease: self.lease_duration,
                renew: self.renew_deadline,
            });
        }
        if self.renew_deadline.as_secs_f64() <= RETRY_JITTER_FACTOR * self.retry_period.as_secs_f64() {
            return Err(ConfigError::RenewTooShortForRetry {
                renew: self.renew_deadline,
                retry: self.retry_period,
            });
        }
        Ok(())
    }

    /// Seconds written into `spec.leaseDurationSeconds`; `validate` guarantees it fits.
    pub fn lease_duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Time the leader gives its work to stop after stepping down before aborting it. Half the
    /// margin between stepping down and the earliest takeover, so the work is gone well before.
    pub fn stop_grace(&self) -> Duration {
        self.lease_duration.saturating_sub(self.renew_deadline) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ElectionConfig {
        ElectionConfig::new("kube-system", "svcplane", "a")
    }

    #[test]
    fn defaults_are_upstreams_and_valid() {
        let c = cfg();
        assert_eq!(
            (c.lease_duration, c.renew_deadline, c.retry_period),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.lease_duration_seconds(), 15);
        assert_eq!(c.stop_grace(), Duration::from_millis(2500));
    }

    #[test]
    fn rejects_inconsistent_timing() {
        let mut c = cfg();
        c.renew_deadline = Duration::from_secs(15);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::LeaseNotLongerThanRenew { .. })
        ));

        let mut c = cfg();
        c.retry_period = Duration::from_secs(9);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RenewTooShortForRetry { .. })
        ));
        // Exactly at the jitter bound is still too short, as in client-go.
        c.renew_deadline = Duration::from_millis(12_000);
        c.retry_period = Duration::from_secs(10);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RenewTooShortForRetry { .. })
        ));

        let mut c = cfg();
        c.retry_period = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroRetryPeriod));

        let mut c = cfg();
        c.lease_duration = Duration::from_millis(15_500);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::LeaseDurationNotWholeSeconds(_))
        ));
    }

    #[test]
    fn rejects_missing_names() {
        let mut c = cfg();
        c.identity.clear();
        assert_eq!(c.validate(), Err(ConfigError::EmptyIdentity));
        let mut c = cfg();
        c.name.clear();
        assert_eq!(c.validate(), Err(ConfigError::EmptyLeaseName));
    }
}
