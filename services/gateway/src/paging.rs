//! What every operator list shares: `limit`/`offset` bounds, the page envelope
//! (`items`, `total`, `has_more`), time filters in milliseconds, and timestamps as RFC 3339.

use checkplane_runtime::http::ApiError;
use serde::Serialize;

pub const RFC3339: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

/// `limit` when none is given.
pub fn default_limit() -> i64 {
    50
}

/// `limit` 1-500 and `offset` 0-1,000,000.
pub fn check_window(limit: i64, offset: i64) -> Result<(), ApiError> {
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation("limit: must be 1-500"));
    }
    if !(0..=1_000_000).contains(&offset) {
        return Err(ApiError::validation("offset: must be 0-1000000"));
    }
    Ok(())
}

/// A time filter in milliseconds since the epoch: years 1970-9999.
pub fn check_millis(field: &str, value: Option<i64>) -> Result<(), ApiError> {
    match value {
        Some(t) if !(0..=253_402_300_799_999).contains(&t) => Err(ApiError::validation(format!(
            "{field}: milliseconds since 1970, before 10000"
        ))),
        _ => Ok(()),
    }
}

/// `?limit=&offset=` of a list with no filters of its own.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[serde(default = "default_limit")]
    pub limit: i64,
    #[serde(default)]
    pub offset: i64,
}

/// One page of a list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
    pub has_more: bool,
}

impl<T> Page<T> {
    pub fn new(items: Vec<T>, total: i64, limit: i64, offset: i64) -> Self {
        let has_more = offset + (items.len() as i64) < total;
        Self {
            items,
            total,
            limit,
            offset,
            has_more,
        }
    }
}
