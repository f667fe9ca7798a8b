//! The OpenAPI 3.1 document of the REST API, built from the handlers' own annotations: a route
//! is added to the router and to the document by the same `routes!` line, so the two cannot
//! drift apart. `docs/openapi.json` is the committed copy, held to the code by a test.

use axum::Json;
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
use utoipa::openapi::security::{SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{AppState, admin, api, collections_api, stores_api, streams, ui};

use crate::ui::SESSION_COOKIE;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Backhaul",
        description = "The operator API of the Backhaul control plane: stores, uploads, collections, schedules, tokens and keys. Every error answers `ErrorBody`, whose code decides the status (docs/PROTOCOL.md, README's error table).",
        license(name = "MIT", identifier = "MIT"),
    ),
    components(schemas(shared::api::ErrorBody)),
    tags(
        (name = "stores", description = "The fleet: who is connected, who was seen"),
        (name = "uploads", description = "One file from one store"),
        (name = "collections", description = "One file from many stores"),
        (name = "schedules", description = "Collections on a cron pattern"),
        (name = "tokens", description = "Admin: the tokens the server signed"),
        (name = "keys", description = "Admin: the keys that sign tokens"),
        (name = "session", description = "The operator page's sign-in"),
        (name = "server", description = "Health, metrics and this document"),
    )
)]
struct ApiDoc;

/// Every API route, each with its place in the document. Requests to the REST routes are
/// answered within [`crate::REST_TIMEOUT`]; the event streams are not, since they live on.
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(api::trigger_download))
        .routes(routes!(api::list_clients))
        .routes(routes!(api::client_status))
        .routes(routes!(stores_api::list))
        .routes(routes!(stores_api::uploads))
        .routes(routes!(api::upload_status, api::cancel_upload))
        .routes(routes!(api::download_link))
        .routes(routes!(collections_api::list, collections_api::create))
        .routes(routes!(collections_api::summary, collections_api::cancel))
        .routes(routes!(collections_api::preview))
        .routes(routes!(collections_api::rows))
        .routes(routes!(collections_api::manifest))
        .routes(routes!(
            collections_api::list_schedules,
            collections_api::create_schedule
        ))
        .routes(routes!(
            collections_api::schedule,
            collections_api::delete_schedule
        ))
        .routes(routes!(api::revoke_client))
        .routes(routes!(admin::list_tokens, admin::issue_token))
        .routes(routes!(admin::revoke_token))
        .routes(routes!(admin::list_keys))
        .routes(routes!(admin::rotate_key))
        .routes(routes!(admin::retire_key))
        .routes(routes!(api::healthz))
        .routes(routes!(api::metrics))
        .routes(routes!(document))
        .merge(ui::api_routes())
        .layer(axum::middleware::from_fn(crate::rest_timeout))
        .routes(routes!(streams::upload_events))
        .routes(routes!(streams::collection_events))
}

/// The document, as `/openapi.json` serves it.
pub fn spec() -> utoipa::openapi::OpenApi {
    finish(api_routes().into_openapi())
}

/// Who may call an operation, by its tag.
fn security_of(op: &Operation) -> Vec<SecurityRequirement> {
    let tags = op.tags.as_deref().unwrap_or_default();
    let is = |t: &str| tags.iter().any(|x| x == t);
    if is("tokens") || is("keys") {
        vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
    } else if op.operation_id.as_deref().is_some_and(is_public) {
        Vec::new()
    } else if is("session") {
        vec![SecurityRequirement::new("session", Vec::<String>::new())]
    } else {
        vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("session", Vec::<String>::new()),
        ]
    }
}

/// Operations that need no credentials.
fn is_public(operation_id: &str) -> bool {
    matches!(operation_id, "healthz" | "openapi_document" | "sign_in")
}

/// The finished document: the security schemes, and on every operation who may call it and the
/// error body of any status it does not list.
pub fn finish(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "An operator token; admin tokens for `tokens` and `keys`",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "session",
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
            SESSION_COOKIE,
            "The operator page's session (POST /ui/session). Requests that change state also send its CSRF token in `x-csrf-token`",
        ))),
    );
    let error = ResponseBuilder::new()
        .description("An error: `error.code` decides the status")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.delete,
            &mut item.put,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let security = security_of(op);
            op.security = Some(security);
            op.responses
                .responses
                .entry("default".to_owned())
                .or_insert_with(|| error.clone().into());
        }
    }
    doc
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi_document", tag = "server",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(spec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is the committed document. A route or body changed without it fails
    /// here; `UPDATE_OPENAPI=1 cargo test -p server --lib openapi` writes it anew, and the diff
    /// shows the contract change for review.
    #[test]
    fn the_committed_document_is_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = format!(
            "{}\n",
            serde_json::to_string_pretty(&spec()).expect("the document serializes")
        );
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the routes and bodies in the code; \
             run UPDATE_OPENAPI=1 cargo test -p server --lib openapi and commit the change"
        );
    }

    #[test]
    fn every_operation_says_who_may_call_it_and_how_it_fails() {
        let doc = serde_json::to_value(spec()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 25, "{} paths", paths.len());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let what = format!("{method} {path}");
                assert!(
                    op["responses"]["default"].is_object(),
                    "{what}: no error body"
                );
                assert!(op["operationId"].is_string(), "{what}: no operation id");
                let security = op["security"].as_array().unwrap();
                let public = ["get /healthz", "get /openapi.json", "post /ui/session"]
                    .contains(&what.as_str());
                assert_eq!(security.is_empty(), public, "{what}: security {security:?}");
            }
        }
    }
}
