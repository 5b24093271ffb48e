//! The safety gates of an environment (`[environments.E.policy]`):
//! deployment windows in a named time zone, blackout dates, a rate limit,
//! the promotion rule (the release ran in the source environment at least
//! so long ago, and still serves there), and approvals (so many distinct
//! identities with the `approver` role approved the release recently).
//!
//! Functional core: [`evaluate`] decides from the policy, the facts the
//! deploy command gathered (recent deploys, the source's record) and the
//! time, with no I/O, so every gate and the "when would it pass" answer
//! are tested here in plain unit tests. A denial names the gate, the
//! figures, and when the deploy would pass, if time alone can make it pass.
//!
//! `deploy-controller deploy --override REASON` deploys anyway: every
//! denial is printed as a warning and the reason, with the gates it
//! overrode, goes into every host's audit record. Rollbacks are never
//! gated: putting the last good release back must always be possible.

use std::time::Duration;

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// `[environments.E.policy]`, checked.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The zone windows and blackout dates are read in (`timezone`, default UTC).
    pub timezone: TimeZone,
    pub timezone_name: String,
    /// Deploys are allowed only inside one of these (none: at any time).
    pub windows: Vec<Window>,
    pub blackouts: Vec<Blackout>,
    pub rate_limit: Option<RateLimit>,
    /// The release ran successfully in the source environment at least this
    /// long ago (needs `promote_from`).
    pub promotion_min_age: Option<Duration>,
    /// Every host of the source environment that ran the release still
    /// serves it.
    pub promotion_still_serving: bool,
    pub approvals: Option<ApprovalRule>,
}

/// `approvals = { min = 2, timeout = "24h" }`: at least `min` distinct
/// identities approved the release within `timeout` before the deploy.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRule {
    pub min: usize,
    pub timeout: Duration,
}

/// `"Mon-Thu 09:00-15:00"`: days of the week and a time of day range
/// (start included, end excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Monday first.
    days: [bool; 7],
    start: u32,
    end: u32,
    text: String,
}

/// `"2026-12-24..2027-01-02"` (both days included) or one day.
#[derive(Debug, Clone, PartialEq)]
pub struct Blackout {
    from: Date,
    to: Date,
    text: String,
}

/// `"1/4h"`: at most `max` successful deploys per `per`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub max: usize,
    pub per: Duration,
    text: String,
}

/// What the deploy command found out before deciding.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Successful deploys of this environment's project on its hosts:
    /// release and when it finished. One fleet deploy is one entry per
    /// host; entries of one release count once.
    pub deploys: Vec<(String, Timestamp)>,
    /// The promotion source's record of the release, when promoting.
    pub source: Option<SourceFacts>,
    /// Approvals of the release recorded on the hosts: identity, when.
    pub approvals: Vec<(String, Timestamp)>,
}

#[derive(Debug, Clone)]
pub struct SourceFacts {
    pub environment: String,
    /// When the first of its hosts that ran the release successfully
    /// started running it.
    pub first_ran_at: Option<Timestamp>,
    /// Hosts that ran it successfully but no longer serve it.
    pub not_serving: Vec<String>,
}

/// One gate's refusal.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// `window`, `blackout`, `rate_limit`, `promotion_age`,
    /// `promotion_serving`, `approvals`: the names in the output and audit.
    pub gate: &'static str,
    pub message: String,
}

/// What the gates say about deploying now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub denials: Vec<Denial>,
    /// When every gate would pass, if waiting is enough (`None`: allowed
    /// now, or a gate that time does not open, such as the source no
    /// longer serving the release).
    pub passes_at: Option<Timestamp>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.denials.is_empty()
    }

    /// The gate names, comma separated.
    pub fn gates(&self) -> String {
        self.denials
            .iter()
            .map(|d| d.gate)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Decides whether `release` may be deployed at `now`.
pub fn evaluate(policy: &Policy, release: &str, facts: &Facts, now: Timestamp) -> Decision {
    let mut denials = Vec::new();
    let local = now.to_zoned(policy.timezone.clone());
    let here = format!(
        "{} {}",
        local.strftime("%a %Y-%m-%d %H:%M"),
        policy.timezone_name
    );

    if let Some(b) = policy.blackout_at(&local) {
        denials.push(Denial {
            gate: "blackout",
            message: format!(
                "blackout {} ({}): it is {here}",
                b.text, policy.timezone_name
            ),
        });
    }
    if !policy.windows.is_empty() && !policy.in_window(&local) {
        denials.push(Denial {
            gate: "window",
            message: format!(
                "outside the deployment window{} {} ({}): it is {here}",
                if policy.windows.len() > 1 { "s" } else { "" },
                policy
                    .windows
                    .iter()
                    .map(|w| w.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                policy.timezone_name
            ),
        });
    }
    if let Some(limit) = &policy.rate_limit
        && let Some(free_at) = limit.free_at(&facts.deploys, now)
    {
        let recent = limit.recent(&facts.deploys, now);
        denials.push(Denial {
            gate: "rate_limit",
            message: format!(
                "rate limit {}: {} deploy(s) in the last {} ({}); the next is allowed at {}",
                limit.text,
                recent.len(),
                humantime::format_duration(limit.per),
                recent
                    .iter()
                    .map(|(r, t)| format!("{r} at {}", short(*t)))
                    .collect::<Vec<_>>()
                    .join(", "),
                short(free_at)
            ),
        });
    }
    if let Some(source) = &facts.source {
        if let Some(min_age) = policy.promotion_min_age {
            match source.first_ran_at {
                Some(at) if age_passes(at, min_age, now) => {}
                Some(at) => denials.push(Denial {
                    gate: "promotion_age",
                    message: format!(
                        "release {release} has run in {} since {}, less than the {} required",
                        source.environment,
                        short(at),
                        humantime::format_duration(min_age)
                    ),
                }),
                None => denials.push(Denial {
                    gate: "promotion_age",
                    message: format!(
                        "{} cannot tell since when release {release} runs there",
                        source.environment
                    ),
                }),
            }
        }
        if policy.promotion_still_serving && !source.not_serving.is_empty() {
            denials.push(Denial {
                gate: "promotion_serving",
                message: format!(
                    "release {release} no longer serves on {} of {}; promote a release {} still runs",
                    source.not_serving.join(", "),
                    source.environment,
                    source.environment
                ),
            });
        }
    }
    if let Some(rule) = &policy.approvals {
        let valid = rule.valid(&facts.approvals, now);
        if valid.len() < rule.min {
            denials.push(Denial {
                gate: "approvals",
                message: format!(
                    "{} of {} approval(s) of release {release} within the last {}{}; {} more needed from \
                     distinct identities with the approver role (deploy-controller approve)",
                    valid.len(),
                    rule.min,
                    humantime::format_duration(rule.timeout),
                    if valid.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({})",
                            valid
                                .iter()
                                .map(|(who, at)| format!("{who} at {}", short(*at)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    rule.min - valid.len()
                ),
            });
        }
    }
    let passes_at = if denials.is_empty() {
        None
    } else {
        next_pass(policy, facts, now)
    };
    Decision { denials, passes_at }
}

/// The earliest instant from `now` at which every gate passes, if waiting
/// is enough and it comes within a year.
fn next_pass(policy: &Policy, facts: &Facts, now: Timestamp) -> Option<Timestamp> {
    if let Some(rule) = &policy.approvals
        && rule.valid(&facts.approvals, now).len() < rule.min
    {
        // Only people make it pass.
        return None;
    }
    if let Some(source) = &facts.source {
        if policy.promotion_still_serving && !source.not_serving.is_empty() {
            return None;
        }
        if policy.promotion_min_age.is_some() && source.first_ran_at.is_none() {
            return None;
        }
    }
    let limit = now
        .checked_add(jiff::SignedDuration::from_hours(366 * 24))
        .ok()?;
    let mut t = now;
    // Each step moves `t` forward to where one failing gate opens; the
    // loop ends when all pass at `t`. Bounded: windows open at least once
    // a week unless none has a day, which the inventory refuses.
    for _ in 0..1000 {
        if t > limit {
            return None;
        }
        let local = t.to_zoned(policy.timezone.clone());
        if let Some(b) = policy.blackout_at(&local) {
            t = start_of(b.to.tomorrow().ok()?, &policy.timezone)?;
            continue;
        }
        if !policy.windows.is_empty() && !policy.in_window(&local) {
            t = policy.next_opening(&local)?;
            continue;
        }
        if let Some(limit) = &policy.rate_limit
            && let Some(free_at) = limit.free_at(&facts.deploys, t)
        {
            t = free_at;
            continue;
        }
        if let (Some(min_age), Some(source)) = (policy.promotion_min_age, &facts.source)
            && let Some(at) = source.first_ran_at
            && !age_passes(at, min_age, t)
        {
            t = at.checked_add(signed(min_age)?).ok()?;
            continue;
        }
        return Some(t);
    }
    None
}

fn age_passes(at: Timestamp, min_age: Duration, now: Timestamp) -> bool {
    match signed(min_age).and_then(|d| at.checked_add(d).ok()) {
        Some(ok_from) => ok_from <= now,
        None => false,
    }
}

fn signed(d: Duration) -> Option<jiff::SignedDuration> {
    jiff::SignedDuration::try_from(d).ok()
}

/// `2026-12-07T14:00:00Z`: whole seconds are enough for a person.
pub fn short(t: Timestamp) -> String {
    format!("{:.0}", t)
}

fn start_of(date: Date, tz: &TimeZone) -> Option<Timestamp> {
    date.at(0, 0, 0, 0)
        .to_zoned(tz.clone())
        .ok()
        .map(|z| z.timestamp())
}

fn seconds_of_day(z: &Zoned) -> u32 {
    let t = z.time();
    t.hour() as u32 * 3600 + t.minute() as u32 * 60 + t.second() as u32
}

fn day_index(w: Weekday) -> usize {
    w.to_monday_zero_offset() as usize
}

impl Policy {
    fn blackout_at(&self, local: &Zoned) -> Option<&Blackout> {
        let d = local.date();
        self.blackouts.iter().find(|b| b.from <= d && d <= b.to)
    }

    fn in_window(&self, local: &Zoned) -> bool {
        let day = day_index(local.weekday());
        let s = seconds_of_day(local);
        self.windows
            .iter()
            .any(|w| w.days[day] && w.start <= s && s < w.end)
    }

    /// The next instant after `local` at which a window opens.
    fn next_opening(&self, local: &Zoned) -> Option<Timestamp> {
        let now = local.timestamp();
        let mut best: Option<Timestamp> = None;
        let mut date = local.date();
        for _ in 0..8 {
            for w in &self.windows {
                if !w.days[day_index(date.weekday())] {
                    continue;
                }
                let (h, rest) = (w.start / 3600, w.start % 3600);
                let Ok(open) = date
                    .at(h as i8, (rest / 60) as i8, (rest % 60) as i8, 0)
                    .to_zoned(self.timezone.clone())
                else {
                    continue;
                };
                let open = open.timestamp();
                if open > now && best.is_none_or(|b| open < b) {
                    best = Some(open);
                }
            }
            if best.is_some() {
                return best;
            }
            date = date.tomorrow().ok()?;
        }
        best
    }
}

impl ApprovalRule {
    /// The approvals that count at `now`: the latest of each identity,
    /// within the timeout, newest first.
    fn valid(&self, approvals: &[(String, Timestamp)], now: Timestamp) -> Vec<(String, Timestamp)> {
        let Some(from) = signed(self.timeout).and_then(|d| now.checked_sub(d).ok()) else {
            return vec![];
        };
        latest_of_each(approvals, |at| at >= from && at <= now)
    }
}

/// The latest time of each key among those `within` keeps, newest first.
fn latest_of_each(
    items: &[(String, Timestamp)],
    within: impl Fn(Timestamp) -> bool,
) -> Vec<(String, Timestamp)> {
    let mut latest: std::collections::BTreeMap<&str, Timestamp> = Default::default();
    for (key, at) in items {
        if within(*at) {
            let e = latest.entry(key.as_str()).or_insert(*at);
            if *at > *e {
                *e = *at;
            }
        }
    }
    let mut v: Vec<(String, Timestamp)> = latest
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    v
}

impl RateLimit {
    /// The successful deploys that count at `now`: one per release, the
    /// latest finish, within the last `per`, newest first.
    fn recent(&self, deploys: &[(String, Timestamp)], now: Timestamp) -> Vec<(String, Timestamp)> {
        let Some(from) = signed(self.per).and_then(|d| now.checked_sub(d).ok()) else {
            return vec![];
        };
        latest_of_each(deploys, |at| at > from && at <= now)
    }

    /// `None` when a deploy is allowed at `now`; else when it will be.
    fn free_at(&self, deploys: &[(String, Timestamp)], now: Timestamp) -> Option<Timestamp> {
        let recent = self.recent(deploys, now);
        if recent.len() < self.max {
            return None;
        }
        // The max-th newest must age out.
        let (_, at) = recent.get(self.max - 1)?;
        at.checked_add(signed(self.per)?).ok()
    }
}

// ---- parsing (the inventory calls these; errors name the value) ----------

/// `"Mon-Thu 09:00-15:00"`, `"Mon,Wed,Fri 10:00-12:00"`, `"* 00:00-24:00"`.
pub fn parse_window(text: &str) -> Result<Window, String> {
    let mut parts = text.split_whitespace();
    let (Some(days), Some(times), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected days and times, like \"Mon-Thu 09:00-15:00\"".into());
    };
    let mut set = [false; 7];
    if days == "*" {
        set = [true; 7];
    } else {
        for item in days.split(',') {
            match item.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    if a > b {
                        return Err(format!(
                            "day range {item:?} runs backwards (write \"Mon-Sun\" order, or list days: \"Fri,Sat,Sun\")"
                        ));
                    }
                    for d in set.iter_mut().take(b + 1).skip(a) {
                        *d = true;
                    }
                }
                None => set[day(item)?] = true,
            }
        }
    }
    let Some((from, to)) = times.split_once('-') else {
        return Err(format!("times {times:?}: expected \"HH:MM-HH:MM\""));
    };
    let (start, end) = (time_of_day(from)?, time_of_day(to)?);
    if end <= start {
        return Err(format!(
            "times {times:?}: the end must be after the start (a window across midnight is two windows)"
        ));
    }
    Ok(Window {
        days: set,
        start,
        end,
        text: text.to_string(),
    })
}

fn day(s: &str) -> Result<usize, String> {
    let names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let lower = s.to_ascii_lowercase();
    names
        .iter()
        .position(|n| lower == *n)
        .ok_or_else(|| format!("{s:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun, or *)"))
}

fn time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time of day HH:MM (00:00 to 24:00)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

/// `"2026-12-24..2027-01-02"` or `"2026-12-25"`.
pub fn parse_blackout(text: &str) -> Result<Blackout, String> {
    let date = |s: &str| {
        s.trim()
            .parse::<Date>()
            .map_err(|e| format!("{s:?} is not a date YYYY-MM-DD: {e}"))
    };
    let (from, to) = match text.split_once("..") {
        Some((a, b)) => (date(a)?, date(b)?),
        None => {
            let d = date(text)?;
            (d, d)
        }
    };
    if to < from {
        return Err("the end date is before the start date".into());
    }
    Ok(Blackout {
        from,
        to,
        text: text.to_string(),
    })
}

/// `"1/4h"`: at most 1 deploy per 4 hours.
pub fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let bad = |why: String| format!("{why}; expected \"COUNT/DURATION\" like \"1/4h\"");
    let (n, per) = text.split_once('/').ok_or_else(|| bad("no `/`".into()))?;
    let max: usize = n
        .trim()
        .parse()
        .map_err(|_| bad(format!("{n:?} is not a count")))?;
    if max == 0 {
        return Err(bad("the count must be at least 1".into()));
    }
    let per = humantime::parse_duration(per.trim()).map_err(|e| bad(format!("{per:?}: {e}")))?;
    if per.is_zero() {
        return Err(bad("the duration must not be zero".into()));
    }
    Ok(RateLimit {
        max,
        per,
        text: text.to_string(),
    })
}

/// A time zone by IANA name (`"America/New_York"`, `"UTC"`).
pub fn parse_timezone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name)
        .map_err(|e| format!("{name:?} is not a time zone name like \"America/New_York\": {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        Policy {
            timezone: parse_timezone("America/New_York").unwrap(),
            timezone_name: "America/New_York".into(),
            windows: vec![],
            blackouts: vec![],
            rate_limit: None,
            promotion_min_age: None,
            promotion_still_serving: false,
            approvals: None,
        }
    }

    fn with_window(w: &str) -> Policy {
        Policy {
            windows: vec![parse_window(w).unwrap()],
            ..policy()
        }
    }

    #[test]
    fn no_gates_allow_everything() {
        let d = evaluate(
            &policy(),
            "r1",
            &Facts::default(),
            ts("2026-12-04T21:00:00Z"),
        );
        assert!(d.allowed());
        assert_eq!(d.passes_at, None);
    }

    #[test]
    fn window_in_its_own_time_zone() {
        let p = with_window("Mon-Thu 09:00-15:00");
        // Thu 2026-12-03 10:00 in New York (UTC-5).
        assert!(evaluate(&p, "r", &Facts::default(), ts("2026-12-03T15:00:00Z")).allowed());
        // The start is inside, the end outside.
        assert!(evaluate(&p, "r", &Facts::default(), ts("2026-12-03T14:00:00Z")).allowed());
        let at_end = evaluate(&p, "r", &Facts::default(), ts("2026-12-03T20:00:00Z"));
        assert_eq!(at_end.denials[0].gate, "window");
        // 08:59 local is outside, though 13:59 UTC is inside 09-15 UTC.
        let early = evaluate(&p, "r", &Facts::default(), ts("2026-12-03T13:59:00Z"));
        assert_eq!(early.denials.len(), 1);
        assert!(
            early.denials[0]
                .message
                .contains("Thu 2026-12-03 08:59 America/New_York"),
            "{early:?}"
        );
        assert_eq!(early.passes_at, Some(ts("2026-12-03T14:00:00Z")));
    }

    #[test]
    fn friday_afternoon_waits_for_monday_morning() {
        let p = with_window("Mon-Thu 09:00-15:00");
        // Fri 2026-12-04 16:00 New York.
        let d = evaluate(&p, "r", &Facts::default(), ts("2026-12-04T21:00:00Z"));
        assert_eq!(d.gates(), "window");
        assert!(
            d.denials[0].message.contains("Mon-Thu 09:00-15:00"),
            "{d:?}"
        );
        assert_eq!(d.passes_at, Some(ts("2026-12-07T14:00:00Z")));
    }

    #[test]
    fn daylight_saving_time_moves_the_window_in_utc() {
        let p = with_window("Mon-Thu 09:00-15:00");
        // Mon 2026-07-06 09:00 in New York is 13:00 UTC (UTC-4 in summer).
        assert!(evaluate(&p, "r", &Facts::default(), ts("2026-07-06T13:00:00Z")).allowed());
        let d = evaluate(&p, "r", &Facts::default(), ts("2026-07-06T12:59:00Z"));
        assert_eq!(d.passes_at, Some(ts("2026-07-06T13:00:00Z")));
    }

    #[test]
    fn several_windows_and_day_lists() {
        let p = Policy {
            windows: vec![
                parse_window("Mon,Wed 10:00-11:00").unwrap(),
                parse_window("Tue 14:00-15:00").unwrap(),
            ],
            ..policy()
        };
        // Mon 2026-12-07 12:00 local: next is Tue 14:00 local = 19:00 UTC.
        let d = evaluate(&p, "r", &Facts::default(), ts("2026-12-07T17:00:00Z"));
        assert_eq!(d.passes_at, Some(ts("2026-12-08T19:00:00Z")));
        assert!(d.denials[0].message.contains("windows"), "{d:?}");
    }

    #[test]
    fn blackout_days_are_whole_local_days_and_push_past_the_window() {
        let p = Policy {
            blackouts: vec![parse_blackout("2026-12-24..2026-12-28").unwrap()],
            ..with_window("Mon-Thu 09:00-15:00")
        };
        // Thu 2026-12-24 10:00 New York: in the window, but blacked out.
        let d = evaluate(&p, "r", &Facts::default(), ts("2026-12-24T15:00:00Z"));
        assert_eq!(d.gates(), "blackout");
        // After the blackout (Tue 29th 00:00), the window opens at 09:00.
        assert_eq!(d.passes_at, Some(ts("2026-12-29T14:00:00Z")));
        // The day before (local) is fine, even when UTC is already the 24th.
        assert!(evaluate(&p, "r", &Facts::default(), ts("2026-12-23T19:30:00Z")).allowed());
        let single = Policy {
            blackouts: vec![parse_blackout("2026-12-25").unwrap()],
            ..policy()
        };
        let d = evaluate(&single, "r", &Facts::default(), ts("2026-12-25T12:00:00Z"));
        assert_eq!(d.passes_at, Some(ts("2026-12-26T05:00:00Z")));
    }

    #[test]
    fn rate_limit_counts_releases_not_hosts() {
        let p = Policy {
            rate_limit: Some(parse_rate_limit("1/4h").unwrap()),
            ..policy()
        };
        let facts = Facts {
            deploys: vec![
                // One fleet deploy of r1 on three hosts.
                ("r1".into(), ts("2026-12-03T10:00:00Z")),
                ("r1".into(), ts("2026-12-03T10:00:05Z")),
                ("r1".into(), ts("2026-12-03T10:00:09Z")),
                // Long ago: does not count.
                ("r0".into(), ts("2026-12-02T10:00:00Z")),
            ],
            source: None,
            approvals: vec![],
        };
        let d = evaluate(&p, "r2", &facts, ts("2026-12-03T12:00:00Z"));
        assert_eq!(d.gates(), "rate_limit");
        assert!(
            d.denials[0].message.contains("1 deploy(s) in the last 4h"),
            "{d:?}"
        );
        assert_eq!(d.passes_at, Some(ts("2026-12-03T14:00:09Z")));
        assert!(evaluate(&p, "r2", &facts, ts("2026-12-03T14:00:10Z")).allowed());

        let two = Policy {
            rate_limit: Some(parse_rate_limit("2/1h").unwrap()),
            ..policy()
        };
        let facts = Facts {
            deploys: vec![
                ("a".into(), ts("2026-12-03T10:00:00Z")),
                ("b".into(), ts("2026-12-03T10:30:00Z")),
            ],
            source: None,
            approvals: vec![],
        };
        let d = evaluate(&two, "c", &facts, ts("2026-12-03T10:45:00Z"));
        // The second newest (a) must age out.
        assert_eq!(d.passes_at, Some(ts("2026-12-03T11:00:00Z")));
    }

    #[test]
    fn rate_limit_and_window_together() {
        let p = Policy {
            rate_limit: Some(parse_rate_limit("1/4h").unwrap()),
            ..with_window("Mon-Thu 09:00-15:00")
        };
        // Thu 13:00 local; the last deploy at 12:00 local frees at 16:00,
        // after the window closes: next is Mon 09:00.
        let facts = Facts {
            deploys: vec![("r1".into(), ts("2026-12-03T17:00:00Z"))],
            source: None,
            approvals: vec![],
        };
        let d = evaluate(&p, "r2", &facts, ts("2026-12-03T18:00:00Z"));
        assert_eq!(d.gates(), "rate_limit");
        assert_eq!(d.passes_at, Some(ts("2026-12-07T14:00:00Z")));
    }

    #[test]
    fn promotion_age_and_serving() {
        let p = Policy {
            promotion_min_age: Some(Duration::from_secs(24 * 3600)),
            promotion_still_serving: true,
            ..policy()
        };
        let young = Facts {
            deploys: vec![],
            source: Some(SourceFacts {
                environment: "staging".into(),
                first_ran_at: Some(ts("2026-12-03T10:00:00Z")),
                not_serving: vec![],
            }),
            approvals: vec![],
        };
        let d = evaluate(&p, "r7", &young, ts("2026-12-04T09:00:00Z"));
        assert_eq!(d.gates(), "promotion_age");
        assert!(
            d.denials[0]
                .message
                .contains("in staging since 2026-12-03T10:00:00Z"),
            "{d:?}"
        );
        assert_eq!(d.passes_at, Some(ts("2026-12-04T10:00:00Z")));
        assert!(evaluate(&p, "r7", &young, ts("2026-12-04T10:00:00Z")).allowed());

        let gone = Facts {
            deploys: vec![],
            source: Some(SourceFacts {
                environment: "staging".into(),
                first_ran_at: Some(ts("2026-12-01T10:00:00Z")),
                not_serving: vec!["stg-2".into()],
            }),
            approvals: vec![],
        };
        let d = evaluate(&p, "r7", &gone, ts("2026-12-04T10:00:00Z"));
        assert_eq!(d.gates(), "promotion_serving");
        assert!(d.denials[0].message.contains("stg-2 of staging"), "{d:?}");
        assert_eq!(d.passes_at, None, "waiting does not help");

        let unknown = Facts {
            deploys: vec![],
            source: Some(SourceFacts {
                environment: "staging".into(),
                first_ran_at: None,
                not_serving: vec![],
            }),
            approvals: vec![],
        };
        let d = evaluate(&p, "r7", &unknown, ts("2026-12-04T10:00:00Z"));
        assert_eq!(d.gates(), "promotion_age");
        assert_eq!(d.passes_at, None);
    }

    #[test]
    fn approvals_count_distinct_recent_identities() {
        let p = Policy {
            approvals: Some(ApprovalRule {
                min: 2,
                timeout: Duration::from_secs(4 * 3600),
            }),
            ..with_window("* 00:00-24:00")
        };
        let now = ts("2026-12-03T12:00:00Z");
        let facts = |a: &[(&str, &str)]| Facts {
            approvals: a.iter().map(|(w, t)| (w.to_string(), ts(t))).collect(),
            ..Facts::default()
        };
        // The same person twice is one approval; one too old does not count.
        let d = evaluate(
            &p,
            "r9",
            &facts(&[
                ("mtls:alice", "2026-12-03T10:00:00Z"),
                ("mtls:alice", "2026-12-03T11:00:00Z"),
                ("mtls:bob", "2026-12-03T07:59:00Z"),
            ]),
            now,
        );
        assert_eq!(d.gates(), "approvals");
        assert!(
            d.denials[0]
                .message
                .contains("1 of 2 approval(s) of release r9 within the last 4h (mtls:alice at 2026-12-03T11:00:00Z); 1 more"),
            "{d:?}"
        );
        assert_eq!(d.passes_at, None, "only people make it pass");
        let ok = facts(&[
            ("mtls:alice", "2026-12-03T10:00:00Z"),
            ("mtls:bob", "2026-12-03T08:00:00Z"),
        ]);
        assert!(evaluate(&p, "r9", &ok, now).allowed());
        let none = evaluate(&p, "r9", &facts(&[]), now);
        assert!(
            none.denials[0]
                .message
                .starts_with("0 of 2 approval(s) of release r9 within the last 4h; 2 more"),
            "{none:?}"
        );
    }

    #[test]
    fn every_gate_is_reported_at_once() {
        let p = Policy {
            blackouts: vec![parse_blackout("2026-12-04").unwrap()],
            rate_limit: Some(parse_rate_limit("1/1h").unwrap()),
            ..with_window("Mon-Thu 09:00-15:00")
        };
        let facts = Facts {
            deploys: vec![("r1".into(), ts("2026-12-04T20:30:00Z"))],
            source: None,
            approvals: vec![],
        };
        let d = evaluate(&p, "r2", &facts, ts("2026-12-04T21:00:00Z"));
        assert_eq!(d.gates(), "blackout, window, rate_limit");
        assert_eq!(d.passes_at, Some(ts("2026-12-07T14:00:00Z")));
    }

    #[test]
    fn parse_errors_name_the_value() {
        for (text, want) in [
            ("Mon-Thu", "expected days and times"),
            ("Mon-Thu 9-15", "is not a time of day"),
            ("Thu-Mon 09:00-15:00", "runs backwards"),
            ("Mon-Fry 09:00-15:00", "\"Fry\" is not a day"),
            ("Mon 15:00-09:00", "the end must be after the start"),
            ("Mon 09:00-24:30", "is not a time of day"),
        ] {
            let err = parse_window(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert!(parse_window("* 00:00-24:00").is_ok());
        assert!(parse_window("mon-sun 00:00-24:00").is_ok());
        assert!(
            parse_blackout("2026-13-01")
                .unwrap_err()
                .contains("not a date")
        );
        assert!(
            parse_blackout("2026-12-05..2026-12-01")
                .unwrap_err()
                .contains("before")
        );
        assert!(parse_rate_limit("0/4h").unwrap_err().contains("at least 1"));
        assert!(
            parse_rate_limit("1 per 4h")
                .unwrap_err()
                .contains("COUNT/DURATION")
        );
        assert!(
            parse_rate_limit("1/soon")
                .unwrap_err()
                .contains("COUNT/DURATION")
        );
        assert!(
            parse_timezone("Mars/Olympus")
                .unwrap_err()
                .contains("not a time zone")
        );
    }

    #[test]
    fn utc_is_a_zone_too() {
        let p = Policy {
            timezone: parse_timezone("UTC").unwrap(),
            timezone_name: "UTC".into(),
            ..with_window("* 09:00-17:00")
        };
        let d = evaluate(&p, "r", &Facts::default(), ts("2026-12-04T17:00:00Z"));
        assert_eq!(d.passes_at, Some(ts("2026-12-05T09:00:00Z")));
    }
}
