//! Writes a slice plan, recording every write in the tracker so the controller recognises its own
//! echoes and never plans from a cache that has not seen them. Shared by the EndpointSlice and
//! mirroring controllers.

use std::sync::Mutex;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams, Preconditions},
};

use super::tracker::SliceTracker;

#[derive(Debug, thiserror::Error)]
#[error("failed to {op} EndpointSlice {name}: {source}")]
pub struct WriteError {
    pub op: &'static str,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// A create refused because its namespace is being deleted: there is nothing to do any more.
pub fn namespace_terminating(status: &kube::core::Status) -> bool {
    status
        .details
        .as_ref()
        .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// Creates, then updates, then deletes (upstream's order: endpoints are added before any are
/// removed). `changed` is told each successful write's operation.
pub async fn write_slices(
    client: &Client,
    namespace: &str,
    create: &[EndpointSlice],
    update: &[EndpointSlice],
    delete: &[&EndpointSlice],
    tracker: &Mutex<SliceTracker>,
    changed: &(dyn Fn(&'static str) + Send + Sync),
) -> Result<(), WriteError> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let track = |f: &dyn Fn(&mut SliceTracker)| {
        f(&mut tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    };
    for slice in create {
        match api.create(&PostParams::default(), slice).await {
            Ok(created) => {
                track(&|t| t.wrote(&created));
                changed("create");
            }
            Err(kube::Error::Api(s)) if namespace_terminating(&s) => return Ok(()),
            Err(source) => {
                let name = slice.metadata.generate_name.clone().unwrap_or_default() + "*";
                return Err(WriteError {
                    op: "create",
                    name,
                    source,
                });
            }
        }
    }
    for slice in update {
        let name = slice.metadata.name.clone().unwrap_or_default();
        match api.replace(&name, &PostParams::default(), slice).await {
            Ok(updated) => {
                track(&|t| t.wrote(&updated));
                changed("update");
            }
            Err(source) => {
                return Err(WriteError {
                    op: "update",
                    name,
                    source,
                });
            }
        }
    }
    for slice in delete {
        let name = slice.metadata.name.clone().unwrap_or_default();
        // Only the slice that was planned from: a recreated slice of the same name is not ours to drop.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: slice.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => {
                track(&|t| t.deleted(slice));
                changed("delete");
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(WriteError {
                    op: "delete",
                    name,
                    source,
                });
            }
        }
    }
    Ok(())
}
