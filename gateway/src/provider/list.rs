//! The provider's list responses (`GET /v1/transactions`), parsed strictly.
//!
//! The shape is undocumented (provider-api.md §2.3); we expect the Stripe convention
//! `{"object":"list","data":[…],"has_more":bool}`. Anything else is an error, never an empty
//! list: an empty list would silently end reconciliation's search. Each item is kept as its exact
//! bytes, so it can be stored and later re-parsed like a webhook's `data`.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// One page of a list.
#[derive(Debug)]
pub struct ListPage {
    /// The items, each as its exact JSON.
    pub data: Vec<Box<RawValue>>,
    /// Whether another page follows (ask with `starting_after` = the last item's id).
    pub has_more: bool,
}

#[derive(Deserialize)]
struct Wire {
    object: String,
    data: Vec<Box<RawValue>>,
    has_more: bool,
}

/// Parses a list body.
///
/// # Errors
/// A reason when the body is not a list object with `data` and `has_more`.
pub fn parse_list(raw: &Bytes) -> Result<ListPage, String> {
    let wire: Wire = serde_json::from_slice(raw).map_err(|e| format!("not a list object: {e}"))?;
    if wire.object != "list" {
        return Err(format!("object is {:?}, not \"list\"", wire.object));
    }
    Ok(ListPage {
        data: wire.data,
        has_more: wire.has_more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_page_parses_and_keeps_each_item_exact() {
        let raw = Bytes::from_static(
            br#"{"object":"list","data":[{"id":"txn_1","amount":4.40},{"id":"txn_2","amount":1e-6}],"has_more":true}"#,
        );
        let page = parse_list(&raw).unwrap();
        assert!(page.has_more);
        assert_eq!(page.data.len(), 2);
        assert_eq!(page.data[0].get(), r#"{"id":"txn_1","amount":4.40}"#);
        assert_eq!(page.data[1].get(), r#"{"id":"txn_2","amount":1e-6}"#);
    }

    #[test]
    fn anything_else_fails_loudly() {
        for body in [
            r#"{"data":[],"has_more":false}"#,
            r#"{"object":"transaction","data":[],"has_more":false}"#,
            r#"{"object":"list","data":[]}"#,
            r#"{"object":"list","items":[],"has_more":false}"#,
            r#"[]"#,
            "",
        ] {
            assert!(
                parse_list(&Bytes::from(body.to_owned())).is_err(),
                "{body:?}"
            );
        }
        let empty = parse_list(&Bytes::from_static(
            br#"{"object":"list","data":[],"has_more":false}"#,
        ))
        .unwrap();
        assert!(empty.data.is_empty() && !empty.has_more);
    }
}
