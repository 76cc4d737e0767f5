//! Business hours of a queue: a weekly schedule in an IANA time zone, with holidays.
//!
//! ```toml
//! hours = {timezone = "Europe/Berlin", mon = "09:00-17:00", tue = "09:00-17:00",
//!          sat = "10:00-14:00", holidays = ["2026-12-24", "2026-12-25"]}
//! ```
//! A day without an entry is closed; a range may cross midnight (`"22:00-06:00"` is open from
//! 22:00 that day to 06:00 the next).

use chrono::{Datelike, NaiveDate, NaiveTime, TimeZone, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoursDef {
    pub timezone: String,
    #[serde(default)]
    pub mon: Option<String>,
    #[serde(default)]
    pub tue: Option<String>,
    #[serde(default)]
    pub wed: Option<String>,
    #[serde(default)]
    pub thu: Option<String>,
    #[serde(default)]
    pub fri: Option<String>,
    #[serde(default)]
    pub sat: Option<String>,
    #[serde(default)]
    pub sun: Option<String>,
    #[serde(default)]
    pub holidays: Vec<String>,
}

/// A validated schedule.
#[derive(Debug, Clone)]
pub struct Hours {
    timezone: Tz,
    /// Monday first; `None` closed.
    days: [Option<(NaiveTime, NaiveTime)>; 7],
    holidays: Vec<NaiveDate>,
}

impl HoursDef {
    /// Validates the schedule; every problem as a message.
    pub fn build(self) -> Result<Hours, Vec<String>> {
        let mut problems = Vec::new();
        let timezone = self.timezone.parse::<Tz>().map_err(|_| {
            format!(
                "hours: `{}` is not an IANA time zone such as \"Europe/Berlin\"",
                self.timezone
            )
        });
        let mut days = [None; 7];
        let specs = [
            &self.mon, &self.tue, &self.wed, &self.thu, &self.fri, &self.sat, &self.sun,
        ];
        for (index, (spec, name)) in specs
            .iter()
            .zip(["mon", "tue", "wed", "thu", "fri", "sat", "sun"])
            .enumerate()
        {
            if let Some(spec) = spec {
                match parse_range(spec) {
                    Some(range) => days[index] = Some(range),
                    None => problems.push(format!(
                        "hours: {name} = `{spec}` is not a range like \"09:00-17:00\""
                    )),
                }
            }
        }
        let mut holidays = Vec::new();
        for day in &self.holidays {
            match NaiveDate::parse_from_str(day, "%Y-%m-%d") {
                Ok(date) => holidays.push(date),
                Err(_) => problems.push(format!(
                    "hours: holiday `{day}` is not a date like \"2026-12-25\""
                )),
            }
        }
        match timezone {
            Ok(timezone) if problems.is_empty() => Ok(Hours {
                timezone,
                days,
                holidays,
            }),
            Ok(_) => Err(problems),
            Err(problem) => {
                problems.insert(0, problem);
                Err(problems)
            }
        }
    }
}

fn parse_range(spec: &str) -> Option<(NaiveTime, NaiveTime)> {
    let (from, to) = spec.split_once('-')?;
    let from = NaiveTime::parse_from_str(from.trim(), "%H:%M").ok()?;
    let to = NaiveTime::parse_from_str(to.trim(), "%H:%M").ok()?;
    (from != to).then_some((from, to))
}

impl Hours {
    /// Whether the queue is open at `now`.
    pub fn is_open(&self, now: OffsetDateTime) -> bool {
        let Some(local) = self
            .timezone
            .timestamp_opt(now.unix_timestamp(), 0)
            .single()
        else {
            return false;
        };
        let date = local.date_naive();
        let time = local.time();
        let today = date.weekday().num_days_from_monday() as usize;
        let yesterday = date.pred_opt().map(|d| (d, d.weekday()));
        // Today's range, before midnight.
        if !self.holidays.contains(&date)
            && let Some((from, to)) = self.days[today]
            && (if from < to {
                from <= time && time < to
            } else {
                time >= from
            })
        {
            return true;
        }
        // Yesterday's range crossing midnight, after midnight.
        if let Some((day, weekday)) = yesterday
            && !self.holidays.contains(&day)
            && let Some((from, to)) = self.days[weekday_index(weekday)]
            && from > to
            && time < to
        {
            return true;
        }
        false
    }
}

fn weekday_index(day: Weekday) -> usize {
    day.num_days_from_monday() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn hours(def: &str) -> Hours {
        toml::from_str::<HoursDef>(def).unwrap().build().unwrap()
    }

    #[test]
    fn weekday_schedule_in_its_time_zone() {
        let h = hours(
            "timezone = \"Europe/Berlin\"\nmon = \"09:00-17:00\"\nholidays = [\"2026-12-21\"]\n",
        );
        // Monday 2026-11-23: 08:30 UTC is 09:30 in Berlin (CET, UTC+1).
        assert!(h.is_open(datetime!(2026-11-23 08:30 UTC)));
        assert!(!h.is_open(datetime!(2026-11-23 07:59 UTC)), "08:59 Berlin");
        assert!(
            !h.is_open(datetime!(2026-11-23 16:00 UTC)),
            "17:00 Berlin is closing time"
        );
        assert!(
            !h.is_open(datetime!(2026-11-24 10:00 UTC)),
            "Tuesday has no hours"
        );
        assert!(
            !h.is_open(datetime!(2026-12-21 10:00 UTC)),
            "a holiday Monday"
        );
    }

    #[test]
    fn ranges_may_cross_midnight() {
        let h = hours("timezone = \"UTC\"\nfri = \"22:00-06:00\"\n");
        assert!(h.is_open(datetime!(2026-11-27 23:00 UTC)), "Friday night");
        assert!(
            h.is_open(datetime!(2026-11-28 05:59 UTC)),
            "Saturday early morning"
        );
        assert!(!h.is_open(datetime!(2026-11-28 06:00 UTC)));
        assert!(!h.is_open(datetime!(2026-11-27 21:59 UTC)));
    }

    #[test]
    fn bad_schedules_name_every_problem() {
        let problems = toml::from_str::<HoursDef>(
            "timezone = \"Mars/Olympus\"\nmon = \"9-5\"\nholidays = [\"Christmas\"]\n",
        )
        .unwrap()
        .build()
        .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("Mars/Olympus"));
        assert!(problems[1].contains("mon = `9-5`"));
        assert!(problems[2].contains("Christmas"));
    }
}
