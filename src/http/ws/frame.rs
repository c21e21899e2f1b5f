//! The frames a server sends (RFC 6455 §5.2), encoded once and written as they are.
//!
//! Why pollcast encodes its own frames instead of handing messages to tungstenite: a server's
//! frames are not masked, so one update's frame is the same bytes for every subscriber of the
//! poll. Made once per update and shared, it goes to each socket with one `write`, where
//! tungstenite framed and copied it again for each of them (docs/BENCHMARKS.md, "Large
//! audience"). What clients send is still read by tungstenite.

use bytes::{BufMut, Bytes, BytesMut};

/// Opcodes of the frames pollcast sends, with the FIN bit (never fragmented).
const TEXT: u8 = 0x81;
const CLOSE: u8 = 0x88;
const PING: u8 = 0x89;

/// A text frame of `payload` (UTF-8, which the caller's JSON is).
pub fn text(payload: &[u8]) -> Bytes {
    frame(TEXT, payload)
}

/// A ping with no payload; clients answer with a pong.
pub fn ping() -> Bytes {
    Bytes::from_static(&[PING, 0])
}

/// A close frame with `code` and a short `reason` (a control frame's payload is at most 125
/// bytes, so the reason is cut to 123).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame(CLOSE, &payload)
}

/// Close codes pollcast sends.
pub const GOING_AWAY: u16 = 1001;
pub const POLICY: u16 = 1008;

fn frame(first: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(first);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};

    /// What a client's tungstenite reads from `bytes`.
    fn read(bytes: &[u8]) -> Vec<Message> {
        let mut socket =
            WebSocket::from_raw_socket(std::io::Cursor::new(bytes.to_vec()), Role::Client, None);
        let mut messages = Vec::new();
        while let Ok(message) = socket.read() {
            messages.push(message);
        }
        messages
    }

    #[test]
    fn text_frames_of_every_length_form_read_back_as_the_same_text() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload = "x".repeat(len);
            let messages = read(&text(payload.as_bytes()));
            assert_eq!(messages, vec![Message::text(payload)], "length {len}");
        }
    }

    #[test]
    fn pings_and_closes_read_back_as_such() {
        let mut stream = ping().to_vec();
        stream.extend_from_slice(&close(POLICY, "too many messages"));
        let messages = read(&stream);
        assert!(matches!(messages[0], Message::Ping(ref p) if p.is_empty()));
        let Message::Close(Some(close)) = &messages[1] else {
            panic!("a close frame, got {:?}", messages[1]);
        };
        assert_eq!(close.code, CloseCode::Policy);
        assert_eq!(close.reason.as_str(), "too many messages");
    }

    #[test]
    fn a_close_reason_is_cut_to_fit_a_control_frame_on_a_character_boundary() {
        let long = "é".repeat(100);
        let bytes = close(GOING_AWAY, &long);
        assert!(bytes.len() - 2 <= 125);
        let Message::Close(Some(close)) = &read(&bytes)[0] else {
            panic!("a close frame");
        };
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "é".repeat(61));
    }
}
