//! Followers: discovery steps that look at processes and change what the
//! kernel probes for them. Each is asked at the same three moments:
//!
//! - at start, about every running process ([`Followers::start`]);
//! - for every record, in the order read ([`Followers::observe`]): a
//!   process's first traffic, or a file it mapped, is the cue to look again;
//! - after each read of the buffers, for work a record scheduled
//!   ([`Followers::after_poll`]);
//! - every few seconds, about the processes that exited ([`Followers::reap`]).
//!
//! What a follower changes that the consumer must know (records of a
//! process carry units of work from now on, or no longer) is a [`Change`],
//! handed on ahead of the record that prompted it. A new follower is one
//! more field here and one more line in each of the three methods.

use std::time::Instant;

use crate::{
    capture::Event,
    kernel::loader::{LoadOptions, Probes},
    runtime::follow::{Change, Follower},
    tls::TlsFollower,
};

pub struct Followers {
    /// Interpreter runtimes whose units of work are followed (CPython).
    pub runtimes: Follower,
    /// TLS libraries whose plaintext is read (OpenSSL).
    pub tls: TlsFollower,
    /// Changes found at start, handed on ahead of the first records.
    found_at_start: Vec<Change>,
}

impl Followers {
    /// Looks at every running process (TLS: every selected one).
    pub fn start(opts: &LoadOptions, probes: &mut Probes) -> Self {
        let mut runtimes = Follower::new(opts.runtimes.clone());
        let found_at_start = runtimes.scan(probes);
        let mut tls = TlsFollower::new(opts.tls);
        let everyone = opts.pids.is_empty() && opts.exes.is_empty();
        tls.scan(
            crate::conn::seed::selected_or_all(&opts.pids, &opts.exes),
            everyone,
            probes,
        );
        Self {
            runtimes,
            tls,
            found_at_start,
        }
    }

    /// Hands on, once, what the look at start found.
    pub fn take_found_at_start(&mut self, changed: &mut impl FnMut(Change)) {
        for change in self.found_at_start.drain(..) {
            changed(change);
        }
    }

    /// A record arrived at `now`, before it is attributed.
    pub fn observe(
        &mut self,
        event: &Event<'_>,
        now: Instant,
        probes: &mut Probes,
        changed: &mut impl FnMut(Change),
    ) {
        // A process is inspected for a runtime to follow when its traffic
        // is first seen.
        match event {
            Event::Data(data) => {
                if let Some(change) = self.runtimes.observe(data.header.tgid, now, probes) {
                    changed(change);
                }
                self.tls.observe(data.header.tgid, probes);
            }
            // New code in a process (exec, dlopen): maybe a TLS library.
            Event::Mapped(mapped) => self.tls.mapped(mapped.header.tgid, mapped.file, now),
            _ => {}
        }
    }

    /// After a read of the buffers: processes that mapped new code are
    /// looked at again.
    pub fn after_poll(&mut self, now: Instant, probes: &mut Probes) {
        self.tls.poll(now, probes);
    }

    /// Forgets processes for which `alive` is false.
    pub fn reap(
        &mut self,
        alive: impl Fn(u32) -> bool + Copy,
        probes: &mut Probes,
        changed: &mut impl FnMut(Change),
    ) {
        for change in self.runtimes.reap(alive, probes) {
            changed(change);
        }
        self.tls.reap(alive, probes);
    }
}
