//! The on-disk encoding of deliveries and dead letters: length-prefixed fields after a version
//! byte. Small, fast, and with no schema machinery; a record that does not decode is reported,
//! never a panic.

use std::sync::Arc;

use bytes::Bytes;

use super::{CallbackRecord, DeadLetter};
use crate::delivery::Delivery;

const DELIVERY_V1: u8 = 1;
const DEAD_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("a stored record is damaged or from an unknown version")]
pub struct DecodeError;

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn opt(&mut self, v: Option<&[u8]>) {
        match v {
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
            None => self.u8(0),
        }
    }
    fn pairs(&mut self, pairs: &[(String, String)]) {
        self.u32(pairs.len() as u32);
        for (k, v) in pairs {
            self.bytes(k.as_bytes());
            self.bytes(v.as_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| DecodeError)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| DecodeError)?,
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError)
    }
    fn arc(&mut self) -> Result<Arc<str>, DecodeError> {
        std::str::from_utf8(self.bytes()?)
            .map(Arc::from)
            .map_err(|_| DecodeError)
    }
    fn opt(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.bytes().map(Some),
            _ => Err(DecodeError),
        }
    }
    fn pairs(&mut self) -> Result<Vec<(String, String)>, DecodeError> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            out.push((self.string()?, self.string()?));
        }
        Ok(out)
    }
}

fn header_value(bytes: Option<&[u8]>) -> Result<Option<http::HeaderValue>, DecodeError> {
    bytes
        .map(|b| http::HeaderValue::from_bytes(b).map_err(|_| DecodeError))
        .transpose()
}

pub fn encode_delivery(d: &Delivery) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(d.body.len() + 192));
    w.u8(DELIVERY_V1);
    w.bytes(d.id.as_bytes());
    w.bytes(d.event_id.as_bytes());
    w.bytes(d.source.as_bytes());
    w.bytes(d.command.as_bytes());
    w.bytes(d.route.as_bytes());
    w.bytes(d.target.as_bytes());
    w.opt(d.content_type.as_ref().map(|v| v.as_bytes()));
    w.bytes(&d.body);
    w.u32(d.attempts);
    w.u64(d.created_at);
    w.u64(d.due_at);
    w.opt(d.last_error.as_deref().map(str::as_bytes));
    w.0
}

pub fn decode_delivery(bytes: &[u8]) -> Result<Delivery, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != DELIVERY_V1 {
        return Err(DecodeError);
    }
    Ok(Delivery {
        id: r.arc()?,
        event_id: r.arc()?,
        source: r.arc()?,
        command: r.arc()?,
        route: r.arc()?,
        target: r.arc()?,
        content_type: header_value(r.opt()?)?,
        body: Bytes::copy_from_slice(r.bytes()?),
        attempts: r.u32()?,
        created_at: r.u64()?,
        due_at: r.u64()?,
        last_error: r.opt()?.map(|b| String::from_utf8_lossy(b).into_owned()),
    })
}

pub fn encode_dead(d: &DeadLetter) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(d.body.len() + d.last_answer.len() + 256));
    w.u8(DEAD_V1);
    // The target first: counting dead letters per target reads only this far.
    w.opt(d.target.as_deref().map(str::as_bytes));
    w.bytes(d.id.as_bytes());
    w.bytes(d.event_id.as_bytes());
    w.bytes(d.source.as_bytes());
    w.bytes(d.command.as_bytes());
    w.bytes(d.route.as_bytes());
    w.bytes(d.reason.as_bytes());
    w.u32(d.attempts);
    w.u32(d.last_status.map(u32::from).unwrap_or(0));
    w.bytes(&d.last_answer);
    w.u64(d.created_at);
    w.u64(d.failed_at);
    w.opt(d.content_type.as_ref().map(|v| v.as_bytes()));
    w.bytes(&d.body);
    match &d.callback {
        Some(c) => {
            w.u8(1);
            w.bytes(c.app_id.as_bytes());
            w.pairs(&c.query);
            w.pairs(&c.headers);
            w.u64(c.received_at);
        }
        None => w.u8(0),
    }
    w.0
}

/// The target label of an encoded dead letter, without decoding the rest.
pub fn dead_target(bytes: &[u8]) -> Result<String, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != DEAD_V1 {
        return Err(DecodeError);
    }
    Ok(r.opt()?
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default())
}

pub fn decode_dead(bytes: &[u8]) -> Result<DeadLetter, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != DEAD_V1 {
        return Err(DecodeError);
    }
    let target = r
        .opt()?
        .map(|b| {
            std::str::from_utf8(b)
                .map(Arc::from)
                .map_err(|_| DecodeError)
        })
        .transpose()?;
    Ok(DeadLetter {
        target,
        id: r.arc()?,
        event_id: r.arc()?,
        source: r.arc()?,
        command: r.arc()?,
        route: r.arc()?,
        reason: r.string()?,
        attempts: r.u32()?,
        last_status: match r.u32()? {
            0 => None,
            s => Some(u16::try_from(s).map_err(|_| DecodeError)?),
        },
        last_answer: Bytes::copy_from_slice(r.bytes()?),
        created_at: r.u64()?,
        failed_at: r.u64()?,
        content_type: header_value(r.opt()?)?,
        body: Bytes::copy_from_slice(r.bytes()?),
        callback: match r.u8()? {
            0 => None,
            1 => Some(CallbackRecord {
                app_id: r.string()?,
                query: r.pairs()?,
                headers: r.pairs()?,
                received_at: r.u64()?,
            }),
            _ => return Err(DecodeError),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn delivery() -> Delivery {
        Delivery {
            id: "01a20147-9628-763f-a6e2-38e8ffa41206".into(),
            event_id: "ev".into(),
            source: "tencent-im".into(),
            command: "Profile.CallbackPortraitSet".into(),
            route: "r".into(),
            target: "t".into(),
            content_type: Some(http::HeaderValue::from_static(
                "application/json; charset=utf-8",
            )),
            body: Bytes::from_static(br#"{"a":1.50}"#),
            attempts: 3,
            created_at: 1,
            due_at: 2,
            last_error: Some("HTTP 503".into()),
        }
    }

    #[test]
    fn deliveries_round_trip() {
        let d = delivery();
        let back = decode_delivery(&encode_delivery(&d)).unwrap();
        assert_eq!(encode_delivery(&back), encode_delivery(&d));
        assert_eq!(back.body, d.body);
        assert_eq!(back.last_error.as_deref(), Some("HTTP 503"));
    }

    #[test]
    fn dead_letters_round_trip() {
        let mut d = DeadLetter::of_delivery(
            &delivery(),
            "gave up".into(),
            Some(503),
            Bytes::from_static(b"busy"),
            9,
        );
        let bytes = encode_dead(&d);
        assert_eq!(dead_target(&bytes).unwrap(), "t");
        let back = decode_dead(&bytes).unwrap();
        assert_eq!(encode_dead(&back), bytes);
        d.target = None;
        d.callback = Some(CallbackRecord {
            app_id: "1400000000".into(),
            query: vec![("SdkAppid".into(), "1400000000".into())],
            headers: vec![("operationid".into(), "op".into())],
            received_at: 5,
        });
        let bytes = encode_dead(&d);
        assert_eq!(dead_target(&bytes).unwrap(), "");
        assert_eq!(encode_dead(&decode_dead(&bytes).unwrap()), bytes);
    }

    #[test]
    fn damaged_records_are_errors() {
        let bytes = encode_delivery(&delivery());
        for cut in [0, 1, 5, bytes.len() - 1] {
            assert!(decode_delivery(&bytes[..cut]).is_err(), "{cut}");
        }
        assert!(decode_dead(&[9, 9, 9]).is_err());
    }
}
