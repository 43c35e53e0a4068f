//! Values as users write them on command lines and in devloop.yaml.

use std::time::Duration;

/// The longest duration accepted anywhere (grace periods, timeouts): a week. Longer ones are
/// mistakes, and deadlines computed from them would overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// `5s`, `300ms`, `2m`, or plain seconds; at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, "s"),
    };
    let value: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    let duration = Duration::try_from_secs_f64(secs).ok()?;
    (duration <= MAX_DURATION).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5h"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("7d"), None);
        assert_eq!(parse_duration("604800s"), Some(MAX_DURATION));
    }

    #[test]
    fn huge_durations_are_refused_not_a_panic() {
        for text in ["99999999999999999999s", "9999999999999999999s", "1e300", "inf", "NaN", "604801s"] {
            assert_eq!(parse_duration(text), None, "{text}");
        }
    }
}
