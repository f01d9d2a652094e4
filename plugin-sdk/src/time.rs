//! Timestamps: RFC 3339 to Unix milliseconds, without a clock or a time
//! zone database (plugins have neither).

/// Parses an RFC 3339 timestamp, `YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`,
/// into milliseconds since the Unix epoch, accepting and rejecting exactly
/// what the host does (it uses the `time` crate), so that a plugin and the
/// host never disagree about a record's time:
///
/// - the date and the time may be separated by any one ASCII character
///   (`T`, `t`, a space, …); `Z` may be `z`;
/// - the fraction may have any number of digits; the instant is truncated
///   to the millisecond toward zero (toward 1970: `1969-12-31T23:59:59.9995Z`
///   is 0, not -1);
/// - an offset is required, hours up to 23, minutes up to 59;
/// - a leap second (`:60`) is accepted only where one can occur, the last
///   second of a month in UTC, and stands for the instant just before the
///   next minute (`…23:59:59.999`); its fraction is ignored.
///
/// ```
/// use livecast_plugin_sdk::time::parse_rfc3339_ms;
/// assert_eq!(parse_rfc3339_ms("2026-05-02T10:15:30.123Z"), Some(1_777_716_930_123));
/// assert_eq!(parse_rfc3339_ms("2026-05-02T12:15:30.1234+02:00"), Some(1_777_716_930_123));
/// assert_eq!(parse_rfc3339_ms("2026-05-02 10:15:30Z"), Some(1_777_716_930_000));
/// assert_eq!(parse_rfc3339_ms("2016-12-31T23:59:60Z"), Some(1_483_228_799_999));
/// assert_eq!(parse_rfc3339_ms("2026-05-02T10:15:60Z"), None); // not a leap second
/// assert_eq!(parse_rfc3339_ms("2026-02-30T00:00:00Z"), None);
/// assert_eq!(parse_rfc3339_ms("2026-05-02T10:15:30"), None); // no offset: ambiguous
/// ```
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |at: usize, len: usize| -> Option<i64> {
        let digits = b.get(at..at.checked_add(len)?)?;
        let mut v = 0i64;
        for &c in digits {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    // Byte 10 separates date and time and may be anything; a multi-byte
    // character there leaves a continuation byte where the hour must be.
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, mut second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    // Milliseconds, and whether the nanoseconds past them are nonzero: all
    // the truncation below needs of the host's nanosecond value.
    let (mut millis, mut sub_millis) = (0i64, false);
    if sep(i, b'.') {
        i += 1;
        let start = i;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            // Digits past the nanosecond are read and ignored.
            match i - start {
                0..3 => millis = millis * 10 + i64::from(c - b'0'),
                3..9 => sub_millis |= c != b'0',
                _ => {}
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
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && sep(i + 3, b':') => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let leap = second == 60;
    if leap {
        // 23:59:59.999999999, whatever fraction was written.
        (second, millis, sub_millis) = (59, 999, true);
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    // A leap second stands in for the last instant of a month, in UTC.
    if leap {
        let next = secs + 1;
        if next.rem_euclid(86_400) != 0 || day_of_month(next.div_euclid(86_400)) != 1 {
            return None;
        }
    }
    // Truncate the instant toward zero, as the host does with nanoseconds.
    let floor = secs * 1_000 + millis;
    Some(if floor < 0 && sub_millis {
        floor + 1
    } else {
        floor
    })
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

/// The day of the month of a day counted from 1970-01-01 (the day part of
/// Hinnant's `civil_from_days`).
fn day_of_month(days: i64) -> i64 {
    let z = days + 719_468;
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    doy - (153 * mp + 2) / 5 + 1
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
        // Any one ASCII character separates the date and the time, as in
        // the host's parser.
        assert_eq!(
            parse_rfc3339_ms("2026-05-02x10:15:30Z"),
            parse_rfc3339_ms("2026-05-02T10:15:30Z")
        );
        // Fraction digits past the nanosecond are read and ignored.
        assert_eq!(
            parse_rfc3339_ms("2026-05-02T10:15:30.123456789999999Z"),
            Some(1_777_716_930_123)
        );
    }

    #[test]
    fn truncates_toward_zero_like_the_host() {
        // The host truncates the instant in nanoseconds toward zero, so just
        // before 1970 a partial millisecond rounds up.
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.9995Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:58.0001Z"), Some(-1_999));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.0009Z"), Some(0));
        // Only the first nine digits count, as in the host's nanoseconds.
        assert_eq!(
            parse_rfc3339_ms("1969-12-31T23:59:59.9990000001Z"),
            Some(-1)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.999000001Z"), Some(0));
    }

    #[test]
    fn leap_seconds_only_at_the_end_of_a_month() {
        let last_ms = Some(1_483_228_799_999);
        assert_eq!(parse_rfc3339_ms("2016-12-31T23:59:60Z"), last_ms);
        assert_eq!(parse_rfc3339_ms("2016-12-31T23:59:60.5Z"), last_ms);
        assert_eq!(parse_rfc3339_ms("2017-01-01T00:59:60+01:00"), last_ms);
        assert_eq!(parse_rfc3339_ms("2016-12-31T22:59:60-01:00"), last_ms);
        assert_eq!(
            parse_rfc3339_ms("2016-06-30T23:59:60Z"),
            Some(1_467_331_199_999)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:60Z"), Some(0));
        for bad in [
            "2016-12-30T23:59:60Z",
            "2016-12-31T23:58:60Z",
            "2016-12-31T22:59:60Z",
            "2016-12-31T23:59:60+01:00",
            "2016-12-31T23:59:61Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-05-02",
            "2026-05-02T10:15:30.Z",
            "2026-05-02T10:15:30,5Z",
            "2026-13-02T10:15:30Z",
            "2026-05-02T24:00:00Z",
            "2026-05-02T10:60:00Z",
            "2026-05-02T10:15:30+0200",
            "2026-05-02T10:15:30Zjunk",
            "2026-05-02T10:15:30+24:00",
            "2026-05-02T10:15:30+01:60",
            "２０２6-05-02T10:15:30Z",
            "+2026-05-02T10:15:30Z",
            "2023-02-29T00:00:00Z",
            "2026-05-02é10:15:30Z",
            "2026-05-0210:15:30Z",
            "2026-05-02TT10:15:30Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
