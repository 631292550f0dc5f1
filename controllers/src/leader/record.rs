use k8s_openapi::{
    api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp,
};

/// The election-relevant part of a Lease's spec, as every client-go compatible elector reads and
/// writes it. Other spec fields (strategy, preferredHolder) are left as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` when nobody holds the lease (absent or empty `holderIdentity`, as after a release).
    pub holder: Option<String>,
    pub lease_duration_seconds: Option<i32>,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
    pub transitions: i32,
}

impl LeaseRecord {
    pub fn from_spec(spec: Option<&LeaseSpec>) -> Self {
        let Some(spec) = spec else {
            return Self::default();
        };
        Self {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }

    /// Writes this record into `spec`, keeping the fields elections do not own.
    pub fn apply_to(&self, spec: &mut LeaseSpec) {
        // client-go writes an empty string rather than dropping the field on release.
        spec.holder_identity = Some(self.holder.clone().unwrap_or_default());
        spec.lease_duration_seconds = self.lease_duration_seconds;
        spec.acquire_time = self.acquire_time.map(MicroTime);
        spec.renew_time = self.renew_time.map(MicroTime);
        spec.lease_transitions = Some(self.transitions);
    }

    pub fn is_held_by(&self, identity: &str) -> bool {
        self.holder.as_deref() == Some(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_holder_reads_as_unheld_and_round_trips() {
        let spec = LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            lease_transitions: Some(4),
            strategy: Some("OldestEmulationVersion".into()),
            ..Default::default()
        };
        let rec = LeaseRecord::from_spec(Some(&spec));
        assert_eq!(rec.holder, None);
        assert_eq!(rec.transitions, 4);

        let mut written = spec.clone();
        rec.apply_to(&mut written);
        assert_eq!(written.holder_identity.as_deref(), Some(""));
        assert_eq!(written.strategy.as_deref(), Some("OldestEmulationVersion"));
        assert_eq!(LeaseRecord::from_spec(Some(&written)), rec);
    }

    #[test]
    fn full_record_round_trips() {
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        let rec = LeaseRecord {
            holder: Some("a".into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(t),
            renew_time: Some(t),
            transitions: 2,
        };
        let mut spec = LeaseSpec::default();
        rec.apply_to(&mut spec);
        assert_eq!(LeaseRecord::from_spec(Some(&spec)), rec);
        assert!(rec.is_held_by("a"));
        assert!(!rec.is_held_by("b"));
    }

    #[test]
    fn missing_spec_is_unheld() {
        assert_eq!(LeaseRecord::from_spec(None), LeaseRecord::default());
    }
}
