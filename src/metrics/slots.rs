// SPDX-License-Identifier: MIT OR Apache-2.0
//! Who gets one of the metrics server's connection slots, pure.
//!
//! A scraper sends its whole request head at once; a client that holds
//! connections open without finishing its head (slowloris, or a stuck
//! proxy) is the only way to keep slots. So when every slot is taken:
//!
//! - a newcomer whose head is already in (read when it was accepted: a
//!   scrape) takes the slot of the connection that has waited longest for
//!   its head, however briefly;
//! - any other newcomer may only take the slot of one that has waited
//!   longer than [`GRACE`], so that a client reconnecting in a loop does
//!   not evict a scrape whose head is on its way;
//! - connections whose head is in (being answered) are never evicted; a
//!   newcomer finding no slot it may take is closed.
//!
//! A client holding every slot, and retaking each one it loses, thus
//! cannot keep a scrape out.

use std::time::{Duration, Instant};

/// How long a connection may wait for its head before a newcomer without
/// one may take its slot.
pub const GRACE: Duration = Duration::from_millis(100);

/// One connection holding a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub opened: Instant,
    /// Its request head has been read (it is being answered).
    pub head_in: bool,
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A slot is free.
    Take,
    /// Close the connection at this index, then take its slot.
    Evict(usize),
    /// Every slot is answering a request: close the newcomer.
    Refuse,
}

/// Decides for a newcomer (`has_head`: its request head is in already) at
/// `now`, given the connections holding slots.
pub fn admit(held: &[Held], max: usize, has_head: bool, now: Instant) -> Admission {
    if held.len() < max {
        return Admission::Take;
    }
    held.iter()
        .enumerate()
        .filter(|(_, h)| !h.head_in)
        .filter(|(_, h)| has_head || now.saturating_duration_since(h.opened) > GRACE)
        .min_by_key(|(_, h)| h.opened)
        .map_or(Admission::Refuse, |(i, _)| Admission::Evict(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn held(t0: Instant, ms: u64, head_in: bool) -> Held {
        Held {
            opened: t0 + Duration::from_millis(ms),
            head_in,
        }
    }

    #[test]
    fn free_slots_are_taken() {
        let t0 = Instant::now();
        assert_eq!(admit(&[], 2, false, t0), Admission::Take);
        assert_eq!(admit(&[held(t0, 0, false)], 2, false, t0), Admission::Take);
    }

    #[test]
    fn the_oldest_connection_without_a_head_makes_room() {
        let t0 = Instant::now();
        let slots = [
            held(t0, 5, false),
            held(t0, 1, true),
            held(t0, 3, false),
            held(t0, 9, false),
        ];
        // A newcomer with its head evicts at once...
        assert_eq!(admit(&slots, 4, true, t0 + ms(10)), Admission::Evict(2));
        // ...one without only a connection that waited past GRACE.
        assert_eq!(admit(&slots, 4, false, t0 + ms(10)), Admission::Refuse);
        let late = t0 + ms(4) + GRACE;
        assert_eq!(admit(&slots, 4, false, late), Admission::Evict(2));
        // Answering connections are never evicted, however old.
        let busy = [held(t0, 0, true), held(t0, 1, true)];
        assert_eq!(admit(&busy, 2, true, t0 + GRACE * 10), Admission::Refuse);
        assert_eq!(admit(&[], 0, true, t0), Admission::Refuse);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Lets `n` hog reconnects arrive, `step` apart, from `now`: each
    /// takes what `admit` gives a newcomer without its head.
    fn hog_retakes(
        slots: &mut Vec<(Held, bool)>,
        max: usize,
        now: &mut Instant,
        n: u32,
        step: Duration,
    ) {
        for _ in 0..n {
            *now += step;
            let view: Vec<Held> = slots.iter().map(|s| s.0).collect();
            match admit(&view, max, false, *now) {
                Admission::Take => {}
                Admission::Evict(i) => {
                    slots.remove(i);
                }
                Admission::Refuse => continue,
            }
            slots.push((held(*now, 0, false), true));
        }
    }

    #[test]
    fn a_hog_retaking_every_slot_cannot_keep_a_scrape_out() {
        // A scrape's head is in when it is accepted (it sent it at once);
        // between scrapes the hog reconnects 50 times, every 100 us.
        let t0 = Instant::now();
        let max = 16;
        // (connection, is the hog's)
        let mut slots: Vec<(Held, bool)> = (0..max)
            .map(|i| (held(t0, i as u64, false), true))
            .collect();
        let mut now = t0 + ms(max as u64);
        for round in 0..100 {
            now += ms(1);
            let view: Vec<Held> = slots.iter().map(|s| s.0).collect();
            match admit(&view, max, true, now) {
                Admission::Take => {}
                Admission::Evict(i) => assert!(slots.remove(i).1, "a hog's"),
                Admission::Refuse => panic!("scrape {round} refused"),
            }
            // Answered at once, and closed.
            hog_retakes(&mut slots, max, &mut now, 50, Duration::from_micros(100));
        }
    }

    #[test]
    fn nor_evict_a_scrape_whose_head_is_on_its_way() {
        // The hog's connections have waited a while; a scrape arrives
        // before its head, then the hog reconnects in a loop until GRACE.
        let t0 = Instant::now();
        let max = 16;
        let mut slots: Vec<(Held, bool)> = (0..max)
            .map(|i| (held(t0, i as u64, false), true))
            .collect();
        let mut now = t0 + GRACE * 2;
        let view: Vec<Held> = slots.iter().map(|s| s.0).collect();
        let Admission::Evict(i) = admit(&view, max, false, now) else {
            panic!("a hog connection past GRACE makes room");
        };
        slots.remove(i);
        slots.push((held(now, 0, false), false));
        hog_retakes(&mut slots, max, &mut now, 990, GRACE / 1000);
        assert!(slots.iter().any(|s| !s.1), "the scrape kept its slot");
    }
}
