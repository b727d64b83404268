//! Fair sharing of the operator-side device services (status relay, read
//! responder) between devices.
//!
//! Each device has at most one request running and one waiting. A newer request
//! from a device replaces its waiting one (for a status write the latest wins; an
//! older read is of no use once a newer one was asked). Devices take turns in the
//! order they first asked, so one device that floods its subject holds one place in
//! the line, never the whole service. The receive loop never waits: a request that
//! finds the line full is answered at once with an error, instead of blocking every
//! device behind it.
//!
//! A line may also space a device's turns by `min_gap`: a request that comes sooner
//! after the device's last turn waits out the rest (still replaceable by a newer
//! one) without holding a worker. An honest agent reports at most every 500 ms, so
//! a gap below that only ever slows a flooding device.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use harmony_reconciler_contracts::Id;
use tokio::sync::Notify;

/// What happened to an offered request.
#[derive(Debug)]
pub enum Offer<J> {
    /// Waiting for its turn.
    Queued,
    /// Waiting for its turn, in place of this older request of the same device,
    /// which will not run.
    Replaced(J),
    /// Refused: the line is full. The request is handed back.
    Full(J),
}

/// Limits of a line.
#[derive(Debug, Clone, Copy)]
pub struct FairLimits {
    /// Devices waiting at most.
    pub max_waiting: usize,
    /// Bytes of waiting requests at most (a status may be 256 KiB).
    pub max_waiting_bytes: usize,
    /// Least time between the starts of two turns of one device.
    pub min_gap: Duration,
}

#[derive(Debug)]
struct Slot<J> {
    running: bool,
    waiting: Option<(J, usize)>,
}

#[derive(Debug)]
struct Line<J> {
    slots: HashMap<Id, Slot<J>>,
    /// Devices with a waiting request that may run, in turn order.
    ready: VecDeque<Id>,
    /// Devices with a waiting request that may run once the time comes.
    spaced: BinaryHeap<Reverse<(Instant, u64, Id)>>,
    spaced_seq: u64,
    /// When each device last started a turn, for devices within `min_gap` of it
    /// (older entries are pruned as the map grows).
    last_start: HashMap<Id, Instant>,
    last_start_pruned_at: usize,
    /// The due time one idle worker sleeps until, for the earliest spaced device.
    /// Only that worker keeps the time: the others wait to be told, so a device
    /// coming due wakes one worker, not every idle one (256 in the relay).
    timer: Option<Instant>,
    /// Times a worker woke and found nothing to take.
    #[cfg(test)]
    empty_wakeups: u64,
    waiting: usize,
    waiting_bytes: usize,
    closed: bool,
}

impl<J> Line<J> {
    /// Puts `device`'s waiting request in line: at the back, or among the spaced
    /// ones if its last turn started less than `min_gap` ago.
    fn make_ready(&mut self, device: &Id, min_gap: Duration) {
        let due = self.last_start.get(device).map(|at| *at + min_gap);
        match due {
            Some(due) if due > Instant::now() => {
                self.spaced_seq += 1;
                self.spaced.push(Reverse((due, self.spaced_seq, device.clone())));
            }
            _ => self.ready.push_back(device.clone()),
        }
    }

    fn started(&mut self, device: &Id, now: Instant, min_gap: Duration) {
        self.last_start.insert(device.clone(), now);
        // Forget starts older than the gap once the map has doubled since the last
        // pruning, so it stays near the number of devices seen within one gap.
        if self.last_start.len() > 2 * self.last_start_pruned_at + 1024 {
            self.last_start.retain(|_, at| now.duration_since(*at) < min_gap);
            self.last_start_pruned_at = self.last_start.len();
        }
    }
}

/// A line of per-device requests; cloned handles share it.
#[derive(Debug)]
pub struct FairQueue<J> {
    line: Arc<Mutex<Line<J>>>,
    wake: Arc<Notify>,
    limits: FairLimits,
}

impl<J> Clone for FairQueue<J> {
    fn clone(&self) -> Self {
        Self {
            line: self.line.clone(),
            wake: self.wake.clone(),
            limits: self.limits,
        }
    }
}

impl<J> FairQueue<J> {
    pub fn new(limits: FairLimits) -> Self {
        Self {
            line: Arc::new(Mutex::new(Line {
                slots: HashMap::new(),
                ready: VecDeque::new(),
                spaced: BinaryHeap::new(),
                spaced_seq: 0,
                last_start: HashMap::new(),
                last_start_pruned_at: 0,
                timer: None,
                #[cfg(test)]
                empty_wakeups: 0,
                waiting: 0,
                waiting_bytes: 0,
                closed: false,
            })),
            wake: Arc::new(Notify::new()),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Line<J>> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offers `device`'s request of `bytes` bytes. Never waits.
    pub fn offer(&self, device: &Id, job: J, bytes: usize) -> Offer<J> {
        let mut guard = self.lock();
        let line = &mut *guard;
        let old_bytes = line.slots.get(device).and_then(|s| s.waiting.as_ref()).map(|(_, b)| *b);
        let waiting_after = line.waiting + usize::from(old_bytes.is_none());
        let bytes_after = line.waiting_bytes - old_bytes.unwrap_or(0) + bytes;
        if waiting_after > self.limits.max_waiting || bytes_after > self.limits.max_waiting_bytes {
            return Offer::Full(job);
        }
        line.waiting = waiting_after;
        line.waiting_bytes = bytes_after;
        let slot = line.slots.entry(device.clone()).or_insert(Slot {
            running: false,
            waiting: None,
        });
        match slot.waiting.replace((job, bytes)) {
            // Its place in the line is kept.
            Some((old, _)) => Offer::Replaced(old),
            None => {
                if !slot.running {
                    line.make_ready(device, self.limits.min_gap);
                    drop(guard);
                    self.wake.notify_one();
                }
                Offer::Queued
            }
        }
    }

    /// The next request whose device has nothing running; `None` once closed.
    pub async fn next(&self) -> Option<(Id, J)> {
        let mut timer = TimerHold { queue: self, due: None };
        #[cfg(test)]
        let mut woke = false;
        loop {
            let notified = self.wake.notified();
            let sleep_until = {
                let mut line = self.lock();
                timer.release(&mut line);
                if line.closed {
                    return None;
                }
                let now = Instant::now();
                while let Some(Reverse((due, _, _))) = line.spaced.peek() {
                    if *due > now {
                        break;
                    }
                    if let Some(Reverse((_, _, device))) = line.spaced.pop() {
                        line.ready.push_back(device);
                    }
                }
                while let Some(device) = line.ready.pop_front() {
                    let Some(slot) = line.slots.get_mut(&device) else {
                        continue;
                    };
                    let Some((job, bytes)) = slot.waiting.take() else {
                        continue;
                    };
                    slot.running = true;
                    line.waiting -= 1;
                    line.waiting_bytes -= bytes;
                    if !self.limits.min_gap.is_zero() {
                        line.started(&device, now, self.limits.min_gap);
                    }
                    if !line.ready.is_empty() || (line.timer.is_none() && !line.spaced.is_empty()) {
                        // Another worker may take the next one, or keep the time.
                        self.wake.notify_one();
                    }
                    return Some((device, job));
                }
                #[cfg(test)]
                if woke {
                    line.empty_wakeups += 1;
                }
                // Nothing to take. Keep the time of the earliest spaced device
                // unless another worker already keeps it (or a later one).
                let earliest = line.spaced.peek().map(|Reverse((due, _, _))| *due);
                match earliest {
                    Some(due) if line.timer.is_none_or(|kept| due < kept) => {
                        line.timer = Some(due);
                        timer.due = Some(due);
                        Some(due)
                    }
                    _ => None,
                }
            };
            match sleep_until {
                Some(due) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(due.into()) => {}
                    }
                }
                None => notified.await,
            }
            #[cfg(test)]
            {
                woke = true;
            }
        }
    }

    /// `device`'s running request is done; its waiting one (if any) gets a turn, at
    /// the back of the line.
    pub fn done(&self, device: &Id) {
        let mut line = self.lock();
        let again = match line.slots.get_mut(device) {
            Some(slot) => {
                slot.running = false;
                slot.waiting.is_some()
            }
            None => false,
        };
        if again {
            line.make_ready(device, self.limits.min_gap);
            drop(line);
            self.wake.notify_one();
        } else {
            line.slots.remove(device);
        }
    }

    /// Ends every [`Self::next`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// Requests waiting (not running).
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

/// The time one worker keeps for the line ([`Line::timer`]). Given back when the
/// worker wakes, and when its `next` is dropped mid-sleep, so the line is never
/// left with a time that nobody keeps.
struct TimerHold<'a, J> {
    queue: &'a FairQueue<J>,
    due: Option<Instant>,
}

impl<J> TimerHold<'_, J> {
    fn release(&mut self, line: &mut Line<J>) -> bool {
        match self.due.take() {
            Some(due) if line.timer == Some(due) => {
                line.timer = None;
                true
            }
            _ => false,
        }
    }
}

impl<J> Drop for TimerHold<'_, J> {
    fn drop(&mut self) {
        if self.due.is_none() {
            return;
        }
        let queue = self.queue;
        let released = self.release(&mut queue.lock());
        if released {
            queue.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    const ROOMY: FairLimits = FairLimits {
        max_waiting: 100,
        max_waiting_bytes: 1 << 20,
        min_gap: Duration::ZERO,
    };

    #[tokio::test]
    async fn a_flooding_device_holds_one_place_and_the_latest_request_wins() {
        let q = FairQueue::new(ROOMY);
        assert!(matches!(q.offer(&id("flood"), 0, 10), Offer::Queued));
        for n in 1..1000 {
            assert!(matches!(q.offer(&id("flood"), n, 10), Offer::Replaced(old) if old == n - 1));
        }
        assert!(matches!(q.offer(&id("a"), 1, 10), Offer::Queued));
        assert!(matches!(q.offer(&id("b"), 1, 10), Offer::Queued));
        assert_eq!(q.waiting(), 3);
        // The flooder asked first and gets its turn first, with its latest request.
        assert_eq!(q.next().await, Some((id("flood"), 999)));
        // While it runs, its next request waits; the others go ahead.
        assert!(matches!(q.offer(&id("flood"), 1000, 10), Offer::Queued));
        assert_eq!(q.next().await, Some((id("a"), 1)));
        assert_eq!(q.next().await, Some((id("b"), 1)));
        q.done(&id("flood"));
        q.done(&id("a"));
        q.done(&id("b"));
        assert_eq!(q.next().await, Some((id("flood"), 1000)));
        q.done(&id("flood"));
        assert_eq!(q.waiting(), 0);
        assert!(q.lock().slots.is_empty(), "finished devices are forgotten");
    }

    #[tokio::test]
    async fn a_full_line_refuses_at_once_and_counts_bytes() {
        let q = FairQueue::new(FairLimits {
            max_waiting: 2,
            max_waiting_bytes: 100,
            min_gap: Duration::ZERO,
        });
        assert!(matches!(q.offer(&id("a"), 1, 10), Offer::Queued));
        assert!(matches!(q.offer(&id("b"), 1, 10), Offer::Queued));
        assert!(matches!(q.offer(&id("c"), 1, 10), Offer::Full(1)));
        // A device already waiting may still replace its own request.
        assert!(matches!(q.offer(&id("a"), 2, 10), Offer::Replaced(1)));
        assert!(matches!(q.next().await, Some((_, _))));
        // Bytes: 10 waiting, 95 more do not fit.
        assert!(matches!(q.offer(&id("d"), 1, 95), Offer::Full(1)));
        assert!(matches!(q.offer(&id("d"), 1, 90), Offer::Queued));
        q.close();
        assert_eq!(q.next().await, None);
    }

    #[tokio::test]
    async fn a_device_waits_out_its_gap_without_holding_up_others() {
        let gap = Duration::from_millis(300);
        let q = FairQueue::new(FairLimits { min_gap: gap, ..ROOMY });
        assert!(matches!(q.offer(&id("flood"), 1, 10), Offer::Queued));
        // Taken before the turn starts: the gap counts from the start the line
        // records inside `next`, which a slow test thread may return from later.
        let first_at = Instant::now();
        let (_, first) = q.next().await.unwrap_or_else(|| panic!("closed"));
        assert_eq!(first, 1);
        q.done(&id("flood"));
        // Sooner than the gap: spaced, and still replaced by a newer request.
        assert!(matches!(q.offer(&id("flood"), 2, 10), Offer::Queued));
        assert!(matches!(q.offer(&id("flood"), 3, 10), Offer::Replaced(2)));
        // Another device is not held up behind it.
        assert!(matches!(q.offer(&id("quiet"), 1, 10), Offer::Queued));
        assert_eq!(q.next().await, Some((id("quiet"), 1)));
        assert!(first_at.elapsed() < gap, "the quiet device went first");
        q.done(&id("quiet"));
        // The spaced one runs once its gap is over, with its latest request.
        assert_eq!(q.next().await, Some((id("flood"), 3)));
        assert!(
            first_at.elapsed() >= gap,
            "turns started {:?} apart",
            first_at.elapsed()
        );
        q.done(&id("flood"));
        assert_eq!(q.waiting(), 0);
    }

    /// Serves `q` with `n` workers; each turn is recorded with when it started.
    fn serve(q: &FairQueue<u32>, n: usize) -> Arc<std::sync::Mutex<Vec<(Id, Instant)>>> {
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        for _ in 0..n {
            let (q, served) = (q.clone(), served.clone());
            tokio::spawn(async move {
                while let Some((device, _)) = q.next().await {
                    served
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((device.clone(), Instant::now()));
                    q.done(&device);
                }
            });
        }
        served
    }

    async fn wait_served(served: &std::sync::Mutex<Vec<(Id, Instant)>>, count: usize) -> Vec<(Id, Instant)> {
        for _ in 0..400 {
            let now = served.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if now.len() >= count {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "not served: {:?}",
            served.lock().unwrap_or_else(PoisonError::into_inner)
        );
    }

    /// A device coming due wakes one worker, not every idle one: the relay has 256,
    /// and under a flood devices come due all the time.
    #[tokio::test]
    async fn a_device_coming_due_wakes_one_worker_not_all() {
        let q = FairQueue::new(FairLimits {
            min_gap: Duration::from_millis(200),
            ..ROOMY
        });
        q.offer(&id("flood"), 1, 10);
        assert_eq!(q.next().await, Some((id("flood"), 1)));
        q.done(&id("flood"));
        q.offer(&id("flood"), 2, 10);
        let served = serve(&q, 64);
        wait_served(&served, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let empty = q.lock().empty_wakeups;
        assert!(empty <= 3, "{empty} workers woke for one device's turn");
        q.close();
    }

    /// A device whose gap ends sooner than the one the kept time is for is still
    /// served when its gap ends, not when the later one's does.
    #[tokio::test]
    async fn a_sooner_due_device_is_not_held_to_a_later_kept_time() {
        let gap = Duration::from_millis(300);
        let q = FairQueue::new(FairLimits { min_gap: gap, ..ROOMY });
        q.offer(&id("b"), 1, 10);
        // Before the turn starts, as the line records it inside `next`.
        let b_started = Instant::now();
        assert!(q.next().await.is_some());
        tokio::time::sleep(Duration::from_millis(250)).await;
        q.offer(&id("a"), 1, 10);
        assert!(q.next().await.is_some());
        q.done(&id("a"));
        q.done(&id("b"));
        let served = serve(&q, 8);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // a first (due later), then b (due sooner).
        q.offer(&id("a"), 2, 10);
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.offer(&id("b"), 2, 10);
        let turns = wait_served(&served, 2).await;
        assert_eq!(turns[0].0, id("b"), "{turns:?}");
        let b_after = turns[0].1.duration_since(b_started);
        assert!(b_after >= gap, "b ran {b_after:?} after its last turn");
        // a's gap ends 250 ms after b's: b did not wait for it.
        assert!(b_after < gap + Duration::from_millis(200), "b waited {b_after:?}");
        q.close();
    }

    #[tokio::test]
    async fn workers_share_the_line_without_losing_a_request() {
        let q: FairQueue<u32> = FairQueue::new(ROOMY);
        let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (q, done) = (q.clone(), done.clone());
            workers.push(tokio::spawn(async move {
                while let Some((device, _)) = q.next().await {
                    tokio::task::yield_now().await;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    q.done(&device);
                }
            }));
        }
        for i in 0..50 {
            q.offer(&id(&format!("d{i}")), i, 1);
        }
        for _ in 0..200 {
            if done.load(std::sync::atomic::Ordering::SeqCst) == 50 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 50);
        q.close();
        for w in workers {
            assert!(w.await.is_ok());
        }
    }
}
