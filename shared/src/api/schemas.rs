//! OpenAPI schemas of the types whose JSON form is not their Rust shape: ids that validate on
//! construction, and labels. The server's OpenAPI document uses them (feature `openapi`), so
//! what it promises a caller is what [`crate::ids`] and [`crate::labels`] accept.

use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::ids::{ClientId, CollectionId, MAX_CLIENT_ID_LEN, ScheduleId, UploadId};
use crate::labels::{Labels, MAX_LABEL_VALUE_LEN, MAX_LABELS};

impl PartialSchema for ClientId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "A store's id: letters, digits, '-', '_' and '.', starting with a letter or digit, without '..'",
            ))
            .min_length(Some(1))
            .max_length(Some(MAX_CLIENT_ID_LEN))
            .pattern(Some("^[A-Za-z0-9][A-Za-z0-9._-]*$"))
            .into()
    }
}
impl ToSchema for ClientId {}

/// The schema of a random UUID id.
fn uuid(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uuid".to_owned())))
        .description(Some(description))
        .into()
}

impl PartialSchema for UploadId {
    fn schema() -> RefOr<Schema> {
        uuid("An upload's id")
    }
}
impl ToSchema for UploadId {}

impl PartialSchema for CollectionId {
    fn schema() -> RefOr<Schema> {
        uuid("A collection's id")
    }
}
impl ToSchema for CollectionId {}

impl PartialSchema for ScheduleId {
    fn schema() -> RefOr<Schema> {
        uuid("A schedule's id")
    }
}
impl ToSchema for ScheduleId {}

impl PartialSchema for Labels {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("The labels a store declares, key to value"))
            .max_properties(Some(MAX_LABELS))
            .additional_properties(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(MAX_LABEL_VALUE_LEN)),
            ))
            .into()
    }
}
impl ToSchema for Labels {}
