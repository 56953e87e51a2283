//! Whether the frontend's device fits the one macvhost serves: its queue pairs against
//! `--queues`, its ring sizes against `--queue-size`. A misfit is the operator's to fix, so it
//! ends the connection with an error that names the flag and the value to use, instead of the
//! handler's bare "invalid parameters".
//!
//! # Queue pairs
//!
//! A frontend does not say how many queue pairs it uses; it addresses vrings by index. QEMU
//! sets up one vhost device per queue pair and, while doing so, sends `SET_VRING_CALL` and
//! `SET_VRING_ERR` (no reply wanted) for both rings of every pair, then decides whether the
//! backend suffices (GET_QUEUE_NUM, answered earlier), then starts the device (SET_FEATURES,
//! SET_MEM_TABLE, SET_VRING_NUM, ...). So the first vring index beyond `--queues` only gives a
//! lower bound. From there the shim *drains*: vring messages beyond the device that want no
//! reply are dropped (never reach the handler) and their largest index is kept; set-up requests
//! (`is_setup`) still go through. The verdict comes with the first request of another kind,
//! a dropped message that wants a reply, the frontend closing the connection (QEMU gives up
//! when it wants more pairs than GET_QUEUE_NUM offered), the frontend staying silent for
//! [`DRAIN_QUIET_MS`] (QEMU reconnecting under a running guest waits for the guest's driver), or
//! [`MAX_DRAINED`] dropped messages: by then every pair the frontend set up has been seen.
//!
//! # Ring sizes
//!
//! `SET_VRING_NUM` above `--queue-size` ends the connection at once, naming the size.
//!
//! Bound: two integers of state; nothing from the frontend is kept.

use vhost::vhost_user::message::{
    FrontendReq, VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};

use super::wire::Message;

/// Most vring messages dropped while draining before the verdict (QEMU sends two per ring:
/// 4 × 256 pairs is ample).
pub const MAX_DRAINED: usize = 1024;

/// How long a draining frontend may stay silent before the verdict (ms): QEMU sets up all its
/// pairs back to back.
pub const DRAIN_QUIET_MS: u16 = 1000;

/// `VHOST_USER_VRING_IDX_MASK`: the vring index bits of a KICK/CALL/ERR payload.
const VRING_IDX_MASK: u64 = 0xff;

/// A device the frontend wants that macvhost was not started for (the operator's to fix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    /// More queue pairs than `--queues`.
    #[error(
        "the frontend uses {frontend} queue pairs (vrings up to {max_index}), macvhost serves \
         {ours}: start macvhost with --queues {frontend}"
    )]
    QueuePairs {
        /// Queue pairs the frontend set up (at least).
        frontend: u32,
        /// Its largest vring index.
        max_index: u32,
        /// `--queues`.
        ours: u16,
    },
    /// More queue pairs than any macvhost serves (the frontend's to fix).
    #[error(
        "the frontend uses {frontend} queue pairs (vrings up to {max_index}), macvhost serves \
         {ours} and at most {limit} (--queues): give the frontend fewer queues"
    )]
    TooManyQueuePairs {
        /// Queue pairs the frontend set up (at least).
        frontend: u32,
        /// Its largest vring index.
        max_index: u32,
        /// `--queues`.
        ours: u16,
        /// [`crate::host::MAX_QUEUE_PAIRS`].
        limit: u16,
    },
    /// A ring larger than `--queue-size`.
    #[error(
        "the frontend uses a {size}-entry ring (vring {index}), macvhost takes at most {max}: \
         start macvhost with --queue-size {size}"
    )]
    RingSize {
        /// The size asked for.
        size: u32,
        /// The vring.
        index: u32,
        /// `--queue-size`.
        max: u16,
    },
    /// A ring larger than any macvhost can serve (the frontend's to fix).
    #[error(
        "the frontend uses a {size}-entry ring (vring {index}); macvhost takes at most {limit} \
         (--queue-size): give the frontend smaller rings"
    )]
    RingTooLarge {
        /// The size asked for.
        size: u32,
        /// The vring.
        index: u32,
        /// [`crate::datapath::MAX_QUEUE_SIZE`].
        limit: u16,
    },
}

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It fits: handle it as usual.
    Pass,
    /// A vring beyond the device, while draining: drop it.
    Drop,
    /// The frontend wants another device: end the connection with this error.
    Misfit(FitError),
}

/// The fit check of one connection (see the module doc).
#[derive(Debug)]
pub struct Fit {
    vrings: u32,
    queue_size: u16,
    /// While draining: the largest vring index seen and how many messages were dropped.
    drain: Option<(u32, usize)>,
}

/// Requests QEMU sends while setting up each queue pair's vhost device, before it decides
/// whether the backend suffices and starts the device.
fn is_setup(code: FrontendReq) -> bool {
    matches!(
        code,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::SET_PROTOCOL_FEATURES
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::SET_BACKEND_REQ_FD
            | FrontendReq::SET_OWNER
            | FrontendReq::SET_VRING_CALL
            | FrontendReq::SET_VRING_ERR
    )
}

/// The vring index of a vring request and, for SET_VRING_NUM, the size. Payload sizes were
/// checked by `wire`.
fn vring_of(m: &Message) -> Option<(u32, u32)> {
    use FrontendReq as R;
    match m.code()? {
        R::SET_VRING_NUM | R::SET_VRING_BASE | R::GET_VRING_BASE | R::SET_VRING_ENABLE => {
            let s: VhostUserVringState = m.body()?;
            Some((s.index, s.num))
        }
        R::SET_VRING_ADDR => m.body::<VhostUserVringAddr>().map(|a| (a.index, 0)),
        R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => m
            .body::<VhostUserU64>()
            .map(|v| ((v.value & VRING_IDX_MASK) as u32, 0)),
        _ => None,
    }
}

impl Fit {
    /// The check for a device of `vrings` rings (2 × `--queues`) of at most `queue_size`.
    pub fn new(vrings: usize, queue_size: u16) -> Fit {
        Fit {
            vrings: u32::try_from(vrings).unwrap_or(u32::MAX),
            queue_size,
            drain: None,
        }
    }

    fn queue_pairs(&self, max_index: u32) -> FitError {
        let frontend = max_index / 2 + 1;
        let ours = u16::try_from(self.vrings / 2).unwrap_or(u16::MAX);
        let limit = crate::host::MAX_QUEUE_PAIRS;
        if frontend <= u32::from(limit) {
            FitError::QueuePairs {
                frontend,
                max_index,
                ours,
            }
        } else {
            FitError::TooManyQueuePairs {
                frontend,
                max_index,
                ours,
                limit,
            }
        }
    }

    /// The verdict on request `m` (already checked by `wire`).
    pub fn check(&mut self, m: &Message) -> Verdict {
        let Some(code) = m.code() else {
            return Verdict::Pass;
        };
        match vring_of(m) {
            Some((index, _)) if index >= self.vrings => {
                let (max, dropped) = self.drain.unwrap_or((index, 0));
                let max = max.max(index);
                // A reply we could only make up, or a frontend that never stops: decide now.
                if m.hdr.need_reply()
                    || code == FrontendReq::GET_VRING_BASE
                    || dropped >= MAX_DRAINED
                {
                    return Verdict::Misfit(self.queue_pairs(max));
                }
                self.drain = Some((max, dropped + 1));
                Verdict::Drop
            }
            _ if self.drain.is_some() && !is_setup(code) => {
                let (max, _) = self.drain.unwrap_or_default();
                Verdict::Misfit(self.queue_pairs(max))
            }
            Some((index, size)) if code == FrontendReq::SET_VRING_NUM => {
                if size <= u32::from(self.queue_size) {
                    Verdict::Pass
                } else if size <= u32::from(crate::datapath::MAX_QUEUE_SIZE) {
                    Verdict::Misfit(FitError::RingSize {
                        size,
                        index,
                        max: self.queue_size,
                    })
                } else {
                    Verdict::Misfit(FitError::RingTooLarge {
                        size,
                        index,
                        limit: crate::datapath::MAX_QUEUE_SIZE,
                    })
                }
            }
            _ => Verdict::Pass,
        }
    }

    /// Whether a vring beyond the device was seen and the verdict is pending.
    pub fn draining(&self) -> bool {
        self.drain.is_some()
    }

    /// The verdict when the frontend closes the connection: a misfit if it was draining (QEMU
    /// gives up on a backend with too few queues after setting them all up).
    pub fn at_close(&self) -> Option<FitError> {
        self.drain.map(|(max, _)| self.queue_pairs(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::shim::wire::Header;

    fn vring_u64(code: FrontendReq, index: u64) -> Message {
        Message::with_body(
            |n| Header::request(code, false, n),
            &VhostUserU64::new(index),
        )
    }

    fn state(code: FrontendReq, index: u32, num: u32, reply: bool) -> Message {
        Message::with_body(
            |n| Header::request(code, reply, n),
            &VhostUserVringState::new(index, num),
        )
    }

    fn bare(code: FrontendReq) -> Message {
        Message {
            hdr: Header::request(code, false, 0),
            payload: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// What QEMU 7.2 sends for one queue pair's vhost device (`vhost_dev_init`), as traced.
    fn qemu_pair_setup(pair: u64) -> Vec<Message> {
        let mut v = vec![
            bare(FrontendReq::GET_FEATURES),
            bare(FrontendReq::GET_PROTOCOL_FEATURES),
            Message::with_body(
                |n| Header::request(FrontendReq::SET_PROTOCOL_FEATURES, false, n),
                &VhostUserU64::new(0),
            ),
            bare(FrontendReq::GET_MAX_MEM_SLOTS),
            bare(FrontendReq::GET_FEATURES),
        ];
        for ring in [2 * pair, 2 * pair + 1] {
            v.push(vring_u64(FrontendReq::SET_VRING_CALL, ring));
            v.push(vring_u64(FrontendReq::SET_VRING_ERR, ring));
        }
        v
    }

    fn run(fit: &mut Fit, msgs: &[Message]) -> Vec<Verdict> {
        msgs.iter().map(|m| fit.check(m)).collect()
    }

    #[test]
    fn qemu_with_four_pairs_against_two_is_named_four_when_the_device_starts() {
        let mut fit = Fit::new(4, 256);
        for pair in 0..2 {
            assert!(run(&mut fit, &qemu_pair_setup(pair))
                .iter()
                .all(|v| *v == Verdict::Pass));
        }
        // Pairs 2 and 3: their set-up requests pass, their vring messages are dropped.
        for pair in 2..4 {
            let verdicts = run(&mut fit, &qemu_pair_setup(pair));
            assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Drop).count(), 4);
            assert!(verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Pass | Verdict::Drop)));
        }
        let v = fit.check(&Message::with_body(
            |n| Header::request(FrontendReq::SET_FEATURES, false, n),
            &VhostUserU64::new(0),
        ));
        let Verdict::Misfit(e) = v else {
            panic!("device start after a misfit passed: {v:?}")
        };
        assert_eq!(
            e,
            FitError::QueuePairs {
                frontend: 4,
                max_index: 7,
                ours: 2
            }
        );
        let text = e.to_string();
        assert!(text.contains("--queues 4"), "{text}");
        assert!(text.contains("uses 4 queue pairs"), "{text}");
    }

    #[test]
    fn frontend_that_gives_up_after_setting_up_eight_pairs_is_named_eight_at_close() {
        let mut fit = Fit::new(2, 256);
        for pair in 0..8 {
            run(&mut fit, &qemu_pair_setup(pair));
        }
        let e = fit.at_close().expect("a misfit at close");
        assert!(e.to_string().contains("--queues 8"), "{e}");
    }

    #[test]
    fn a_fitting_frontend_closing_is_no_misfit() {
        let mut fit = Fit::new(4, 256);
        run(&mut fit, &qemu_pair_setup(0));
        run(&mut fit, &qemu_pair_setup(1));
        assert_eq!(fit.at_close(), None);
    }

    #[test]
    fn vring_beyond_the_device_that_wants_a_reply_is_a_misfit_at_once() {
        let mut fit = Fit::new(2, 256);
        let v = fit.check(&state(FrontendReq::GET_VRING_BASE, 3, 0, false));
        assert!(
            matches!(v, Verdict::Misfit(FitError::QueuePairs { frontend: 2, .. })),
            "{v:?}"
        );
        let mut fit = Fit::new(2, 256);
        let v = fit.check(&state(FrontendReq::SET_VRING_ENABLE, 2, 1, true));
        assert!(matches!(v, Verdict::Misfit(_)), "{v:?}");
    }

    #[test]
    fn endless_out_of_range_vring_messages_end_in_a_verdict() {
        let mut fit = Fit::new(2, 256);
        let m = vring_u64(FrontendReq::SET_VRING_CALL, 9);
        for _ in 0..MAX_DRAINED {
            assert_eq!(fit.check(&m), Verdict::Drop);
        }
        assert!(matches!(fit.check(&m), Verdict::Misfit(_)));
    }

    #[test]
    fn ring_of_1024_against_256_names_the_flag_and_the_size() {
        let mut fit = Fit::new(2, 256);
        assert_eq!(
            fit.check(&state(FrontendReq::SET_VRING_NUM, 0, 256, false)),
            Verdict::Pass
        );
        let Verdict::Misfit(e) = fit.check(&state(FrontendReq::SET_VRING_NUM, 1, 1024, false))
        else {
            panic!("a 1024-entry ring passed a 256 limit")
        };
        assert_eq!(
            e,
            FitError::RingSize {
                size: 1024,
                index: 1,
                max: 256
            }
        );
        assert!(e.to_string().contains("--queue-size 1024"), "{e}");
    }

    #[test]
    fn ring_beyond_any_queue_size_blames_the_frontend_not_the_flag() {
        let mut fit = Fit::new(2, 1024);
        let Verdict::Misfit(e) = fit.check(&state(FrontendReq::SET_VRING_NUM, 0, 32768, false))
        else {
            panic!("a 32768-entry ring passed")
        };
        assert!(
            matches!(e, FitError::RingTooLarge { size: 32768, .. }),
            "{e:?}"
        );
        assert!(!e.to_string().contains("--queue-size 32768"), "{e}");
    }

    #[test]
    fn kick_call_err_index_is_the_low_byte_and_the_no_fd_bit_is_ignored() {
        let mut fit = Fit::new(2, 256);
        // Index 1 with VHOST_USER_VRING_NOFD_MASK (bit 8): in range.
        assert_eq!(
            fit.check(&vring_u64(FrontendReq::SET_VRING_KICK, 0x101)),
            Verdict::Pass
        );
    }
}
