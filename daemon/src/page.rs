//! One page of an Admin listing (sessions, grants, the ledger): as many rows as fit one gRPC
//! message. A listing of a busy daemon never fits one answer (`limits.max_message_bytes`), so each
//! answer carries a page and the key to continue after; callers ask until that key is empty.

use prost::Message;

/// Rows one page reads from the store at most (fewer go out when they do not fit one message).
pub const ROWS: u32 = 1000;

/// Bytes of a message kept spare besides its rows and continuation key (its framing).
const SPARE: usize = 64;

/// The first of `rows` that fit in one message of `max_bytes` as its repeated field, together with
/// the continuation key `key_bytes` says a page ending at that row needs (at least one row, so that
/// every page moves on), and whether any were left out.
pub fn fit<T: Message>(
    rows: impl IntoIterator<Item = T>,
    max_bytes: usize,
    key_bytes: impl Fn(&T) -> usize,
) -> (Vec<T>, bool) {
    let max_bytes = max_bytes.saturating_sub(SPARE);
    let (mut page, mut bytes) = (Vec::new(), 0);
    for row in rows {
        // A repeated field's entry: a tag, a length prefix and the row.
        let size = field_bytes(row.encoded_len());
        if bytes + size + key_bytes(&row) > max_bytes && !page.is_empty() {
            return (page, true);
        }
        bytes += size;
        page.push(row);
    }
    (page, false)
}

/// The encoded size of a length-delimited field (string, bytes, message) of `len` bytes whose
/// field number is below 16.
pub fn field_bytes(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}
