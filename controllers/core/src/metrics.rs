//! Registering a metric where it is made: every metric struct builds each collector with
//! [`registered`], so a metric cannot be created and then forgotten by the registry (or
//! registered twice by a second list kept in step by hand).

use prometheus::{Registry, core::Collector};

/// Registers `collector` with `registry` and hands it back.
pub fn registered<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

#[cfg(test)]
mod tests {
    use prometheus::IntCounter;

    use super::*;

    #[test]
    fn a_registered_metric_is_gathered_and_cannot_be_registered_twice() {
        let registry = Registry::new();
        let c = registered(
            &registry,
            IntCounter::new("svcplane_test_total", "a test").unwrap(),
        )
        .unwrap();
        c.inc();
        let families = registry.gather();
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].name(), "svcplane_test_total");
        assert!(
            registered(
                &registry,
                IntCounter::new("svcplane_test_total", "again").unwrap()
            )
            .is_err()
        );
    }
}
