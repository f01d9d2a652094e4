//! The host side of the plugin ABI (docs/plugin-abi.md): writing a batch into
//! a plugin's input region and reading, with every bound checked, the verdict
//! table it returns.

/// Verdict codes of the output table.
pub const PASS: u32 = 0;
pub const DROP: u32 = 1;
pub const REPLACE: u32 = 2;

/// One audience of the delivery stage, as the plugin sees it.
#[derive(Debug, Clone, Copy)]
pub struct AudienceRef<'a> {
    pub topic: &'a str,
    pub role: &'a str,
    pub user_id: &'a str,
}

/// Bytes a `filter_batch` input of these records takes.
pub fn filter_input_len(records: &[&[u8]]) -> usize {
    4 + 8 * records.len() + records.iter().map(|r| r.len()).sum::<usize>()
}

/// Writes a `filter_batch` input into `out` (exactly `filter_input_len` bytes).
pub fn write_filter_input(out: &mut [u8], records: &[&[u8]]) {
    let mut w = Writer { out, at: 0 };
    w.u32(records.len() as u32);
    let mut data = 4 + 8 * records.len();
    for r in records {
        w.u32(data as u32);
        w.u32(r.len() as u32);
        data += r.len();
    }
    for r in records {
        w.bytes(r);
    }
}

/// Bytes a `deliver_batch` input takes.
pub fn deliver_input_len(
    records: &[&[u8]],
    audiences: &[AudienceRef<'_>],
    pairs: &[(u32, u32)],
) -> usize {
    let data: usize = records.iter().map(|r| r.len()).sum::<usize>()
        + audiences
            .iter()
            .map(|a| a.topic.len() + a.role.len() + a.user_id.len())
            .sum::<usize>();
    4 + 8 * records.len() + 4 + 24 * audiences.len() + 4 + 8 * pairs.len() + data
}

/// Writes a `deliver_batch` input into `out` (exactly `deliver_input_len` bytes).
pub fn write_deliver_input(
    out: &mut [u8],
    records: &[&[u8]],
    audiences: &[AudienceRef<'_>],
    pairs: &[(u32, u32)],
) {
    let tables = 4 + 8 * records.len() + 4 + 24 * audiences.len() + 4 + 8 * pairs.len();
    let mut w = Writer { out, at: 0 };
    let mut data = tables;
    let mut place = |len: usize| {
        let at = data;
        data += len;
        at as u32
    };
    w.u32(records.len() as u32);
    for r in records {
        w.u32(place(r.len()));
        w.u32(r.len() as u32);
    }
    w.u32(audiences.len() as u32);
    for a in audiences {
        for s in [a.topic, a.role, a.user_id] {
            w.u32(place(s.len()));
            w.u32(s.len() as u32);
        }
    }
    w.u32(pairs.len() as u32);
    for &(r, a) in pairs {
        w.u32(r);
        w.u32(a);
    }
    for r in records {
        w.bytes(r);
    }
    for a in audiences {
        for s in [a.topic, a.role, a.user_id] {
            w.bytes(s.as_bytes());
        }
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn u32(&mut self, v: u32) {
        self.out[self.at..self.at + 4].copy_from_slice(&v.to_le_bytes());
        self.at += 4;
    }
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

/// One decoded verdict; a replacement borrows the plugin's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawVerdict<'m> {
    Pass,
    Drop,
    Replace(&'m [u8]),
}

fn read_u32(mem: &[u8], at: usize) -> Option<u32> {
    let b = mem.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads the output table at `ptr` in `mem`, which must hold `expected`
/// verdicts, turning each into a `T` with `each` (which may reject it).
/// `Err` names the broken rule.
pub fn read_output<'m, T>(
    mem: &'m [u8],
    ptr: u32,
    expected: usize,
    mut each: impl FnMut(RawVerdict<'m>) -> Result<T, &'static str>,
) -> Result<Vec<T>, &'static str> {
    if ptr == 0 {
        return Err("the plugin returned 0 (failure)");
    }
    let base = ptr as usize;
    let n = read_u32(mem, base).ok_or("output table outside memory")? as usize;
    if n != expected {
        return Err("output count differs from the input");
    }
    let table = base
        .checked_add(4)
        .and_then(|b| Some((b, b.checked_add(n.checked_mul(12)?)?)))
        .and_then(|(b, e)| mem.get(b..e))
        .ok_or("output table outside memory")?;
    let mut out = Vec::with_capacity(n);
    for entry in table.chunks_exact(12) {
        let word =
            |i: usize| u32::from_le_bytes([entry[i], entry[i + 1], entry[i + 2], entry[i + 3]]);
        let verdict = match word(0) {
            PASS => RawVerdict::Pass,
            DROP => RawVerdict::Drop,
            REPLACE => {
                let (p, len) = (word(4) as usize, word(8) as usize);
                let bytes = p
                    .checked_add(len)
                    .and_then(|e| mem.get(p..e))
                    .ok_or("replacement outside memory")?;
                RawVerdict::Replace(bytes)
            }
            _ => return Err("unknown verdict"),
        };
        out.push(each(verdict)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_input_layout() {
        let recs: [&[u8]; 2] = [b"{a}", b"{bb}"];
        let mut buf = vec![0u8; filter_input_len(&recs)];
        write_filter_input(&mut buf, &recs);
        let u = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
        assert_eq!((u(0), u(4), u(8), u(12), u(16)), (2, 20, 3, 23, 4));
        assert_eq!(&buf[20..], b"{a}{bb}");
    }

    #[test]
    fn deliver_input_layout() {
        let recs: [&[u8]; 1] = [b"{r}"];
        let auds = [AudienceRef {
            topic: "event:x",
            role: "",
            user_id: "u1",
        }];
        let pairs = [(0, 0)];
        let mut buf = vec![0u8; deliver_input_len(&recs, &auds, &pairs)];
        write_deliver_input(&mut buf, &recs, &auds, &pairs);
        let u = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap()) as usize;
        assert_eq!(u(0), 1);
        let (roff, rlen) = (u(4), u(8));
        assert_eq!(&buf[roff..roff + rlen], b"{r}");
        assert_eq!(u(12), 1);
        let (toff, tlen, _, rolelen, uoff, ulen) = (u(16), u(20), u(24), u(28), u(32), u(36));
        assert_eq!(&buf[toff..toff + tlen], b"event:x");
        assert_eq!(rolelen, 0);
        assert_eq!(&buf[uoff..uoff + ulen], b"u1");
        assert_eq!((u(40), u(44), u(48)), (1, 0, 0));
    }

    #[test]
    fn output_is_bounds_checked() {
        let mut mem = vec![0u8; 64];
        let put = |mem: &mut Vec<u8>, at: usize, v: u32| {
            mem[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut mem, 8, 2);
        put(&mut mem, 12, PASS);
        put(&mut mem, 24, REPLACE);
        put(&mut mem, 28, 50);
        put(&mut mem, 32, 4);
        mem[50..54].copy_from_slice(b"{xy}");
        fn read(mem: &[u8], ptr: u32, n: usize) -> Result<Vec<RawVerdict<'_>>, &'static str> {
            read_output(mem, ptr, n, Ok)
        }
        assert_eq!(
            read(&mem, 8, 2),
            Ok(vec![RawVerdict::Pass, RawVerdict::Replace(b"{xy}")])
        );
        assert!(read(&mem, 8, 3).is_err(), "count mismatch");
        assert!(read(&mem, 0, 2).is_err(), "0 is failure");
        assert!(read(&mem, 62, 2).is_err(), "table outside memory");
        put(&mut mem, 32, 40);
        assert!(read(&mem, 8, 2).is_err(), "replacement outside memory");
        put(&mut mem, 24, 9);
        assert!(read(&mem, 8, 2).is_err(), "unknown verdict");
    }
}
