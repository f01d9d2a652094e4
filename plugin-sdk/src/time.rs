//! Timestamps: RFC 3339 / ISO 8601 to Unix milliseconds, without a clock or
//! a time zone database (plugins have neither).

/// Parses `YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)` into milliseconds since
/// the Unix epoch. `t`/`z` and a space instead of `T` are accepted, as RFC 3339
/// allows; digits past the millisecond are truncated, as JavaScript does. A
/// leap second (`:60`) counts as the first second of the next minute.
///
/// ```
/// use livecast_plugin_sdk::time::parse_rfc3339_ms;
/// assert_eq!(parse_rfc3339_ms("2026-05-02T10:15:30.123Z"), Some(1_777_716_930_123));
/// assert_eq!(parse_rfc3339_ms("2026-05-02T12:15:30.1234+02:00"), Some(1_777_716_930_123));
/// assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
/// assert_eq!(parse_rfc3339_ms("2026-02-30T00:00:00Z"), None);
/// assert_eq!(parse_rfc3339_ms("2026-05-02T10:15:30"), None); // no offset: ambiguous
/// ```
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |range: core::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        let mut v = 0i64;
        for &c in digits {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            if i - start < 3 {
                millis = millis * 10 + i64::from(c - b'0');
            }
            i += 1;
        }
        match i - start {
            0 => return None,
            1 => millis *= 100,
            2 => millis *= 10,
            _ => {}
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b.get(i + 3) == Some(&b':') => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1_000 + millis)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar
/// (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T23:59:59.999Z"),
            Some(951_868_799_999)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.5Z"), Some(-500));
        assert_eq!(
            parse_rfc3339_ms("2026-05-02 10:15:30.12z"),
            Some(1_777_716_930_120)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-05-02T05:15:30.123-05:00"),
            Some(1_777_716_930_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2016-12-31T23:59:60Z"),
            parse_rfc3339_ms("2017-01-01T00:00:00Z")
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-05-02",
            "2026-05-02T10:15:30.Z",
            "2026-13-02T10:15:30Z",
            "2026-05-02T24:00:00Z",
            "2026-05-02T10:15:30+0200",
            "2026-05-02T10:15:30Zjunk",
            "2026-05-02T10:15:30+24:00",
            "２０２6-05-02T10:15:30Z",
            "+2026-05-02T10:15:30Z",
            "2023-02-29T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
