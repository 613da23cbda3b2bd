//! Ranks as processes over TCP: the rendezvous that gathers a data-parallel run's ranks (and
//! checks that they run the same binary with the same configuration) and a [`Collective`]
//! through rank 0.
//!
//! The transport is for correctness and fault handling, not speed: every rank has one
//! connection to rank 0, which sums the contributions in rank order (the same bits as
//! [`super::collective::ThreadGroup`]) and sends the sum back. On a GPU the bulk traffic goes
//! over NCCL; this connection stays the run's control plane.
//!
//! Liveness: every connection carries a heartbeat in both directions. A rank that sends nothing
//! (no data, no heartbeat) for the configured timeout is reported as hung or unreachable; a
//! closed connection as exited; a rank that fails sends its error, which rank 0 relays to the
//! others. No rank waits forever on another.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::device::collective::Collective;
use crate::error::{Error, Result};

/// Sent first on every connection, so a stray connection (another program, another
/// protocol version) is told apart from a rank.
const MAGIC: &[u8; 8] = b"CARPDP01";

/// Frame kinds: a frame is kind (u8), payload length (u64 LE), payload.
const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const ABORT: u8 = 3;
const DATA: u8 = 4;
const BEAT: u8 = 5;

/// No legitimate frame is larger (a ResNet50 gradient in f64 is ~0.3 GB): a length beyond it is
/// a corrupt stream, refused before allocating.
const MAX_FRAME: u64 = 16 << 30;

/// Where and how the ranks of a run meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// This rank, in 0..world.
    pub rank: usize,
    pub world: usize,
    /// Rank 0's host (rank 0 listens on every interface of its machine).
    pub master_addr: String,
    pub master_port: u16,
    /// How long the rendezvous waits for every rank, and how long a rank may stay silent (no
    /// heartbeat) before the others give up on it.
    pub timeout: Duration,
}

/// What a rank tells rank 0 when it arrives: everything that must agree across ranks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The run's configuration and options as a JSON object; rank 0 compares it field by field.
    pub config: serde_json::Value,
    /// What identifies the program (version and a checksum of the executable).
    pub binary: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    rank: usize,
    world: usize,
    identity: Identity,
}

/// One end of a connection: reads happen on the owning thread only; writes (data and
/// heartbeats) go through the mutex.
struct Link {
    /// The rank at the other end.
    peer: usize,
    reader: Mutex<TcpStream>,
    writer: Arc<Mutex<TcpStream>>,
    /// Frames the owning thread has read from the peer (heartbeats included): the watchdog's
    /// sign that the peer lives while the owning thread reads.
    frames: Arc<AtomicU64>,
}

/// What the watchdog does when a peer is lost while this rank's own thread cannot notice
/// (busy, or stuck inside a device collective): by default print why and end the process
/// with [`crate::error::PEER_EXIT_CODE`].
pub type OnPeerLost = Arc<dyn Fn(String) + Send + Sync>;

fn exit_on_peer_lost() -> OnPeerLost {
    Arc::new(|why: String| {
        eprintln!("error: {why}");
        std::process::exit(crate::error::PEER_EXIT_CODE as i32);
    })
}

/// One rank of a data-parallel run whose ranks are processes connected over TCP.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: one link per other rank, in rank order (index r - 1). Others: the link to rank 0.
    links: Vec<Link>,
    /// Set on drop: the heartbeat thread stops.
    closed: Arc<AtomicBool>,
    /// Set once this rank has aborted: later calls fail at once instead of waiting.
    failed: Arc<Mutex<Option<String>>>,
}

impl TcpGroup {
    /// Joins the run described by `rv`: rank 0 listens on `master_port` and waits for every
    /// other rank; the others connect to `master_addr:master_port`. Rank 0 checks each arrival
    /// against its own `identity` and refuses the whole run (telling every rank why) on a
    /// mismatch. Returns when all ranks are connected, or an error that names the cause (a port
    /// in use, an unreachable master, a rank that never arrived, a mismatch).
    pub fn join(rv: &Rendezvous, identity: &Identity) -> Result<TcpGroup> {
        Self::join_watched(rv, identity, exit_on_peer_lost())
    }

    /// [`TcpGroup::join`] with another action for the watchdog: it runs when a peer has
    /// closed its connection, or sent nothing for one and a half timeouts, and this rank has
    /// not noticed on its own (its thread is busy elsewhere, or stuck in an NCCL call whose
    /// peer died and that will never return).
    pub fn join_watched(
        rv: &Rendezvous,
        identity: &Identity,
        on_lost: OnPeerLost,
    ) -> Result<TcpGroup> {
        if rv.world == 0 || rv.rank >= rv.world {
            crate::bail!(
                Config,
                "rank {} in a world of {} ranks: the rank must be below the world size",
                rv.rank,
                rv.world
            );
        }
        let links = if rv.rank == 0 {
            gather_ranks(rv, identity)?
        } else {
            vec![reach_master(rv, identity)?]
        };
        let closed = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        start_heartbeat(&links, rv.timeout, closed.clone(), failed.clone(), on_lost)?;
        Ok(TcpGroup {
            rank: rv.rank,
            world: rv.world,
            timeout: rv.timeout,
            links,
            closed,
            failed,
        })
    }

    fn check_not_failed(&self) -> Result<()> {
        if let Some(why) = self.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(Error::Peer(why));
        }
        Ok(())
    }

    /// Records `why` (another rank's failure, or what went wrong with it) as the reason this
    /// rank stops, tells the other ranks (rank 0: all of them; another rank: rank 0, which
    /// relays), and returns it as the error.
    fn fail(&self, why: String) -> Error {
        if let Ok(mut f) = self.failed.lock() {
            if f.is_none() {
                *f = Some(why.clone());
                for l in &self.links {
                    let _ = send(l, ABORT, why.as_bytes());
                }
            }
        }
        Error::Peer(why)
    }

    /// Reads the next data frame from `l`, skipping heartbeats; an abort, a closed connection,
    /// or silence longer than the timeout is an error naming the peer.
    fn recv_data(&self, l: &Link) -> Result<Vec<u8>> {
        match recv(l, self.timeout) {
            Ok((DATA, p)) => Ok(p),
            Ok((ABORT, p)) => {
                let msg = String::from_utf8_lossy(&p).into_owned();
                let why = if msg.starts_with("rank ") {
                    msg
                } else {
                    format!("rank {}: {msg}", l.peer)
                };
                Err(self.fail(why))
            }
            Ok((kind, _)) => Err(self.fail(format!(
                "rank {} sent an unexpected message (kind {kind}) during a collective: the \
                 ranks are out of step (a bug, or different binaries)",
                l.peer
            ))),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Every rank contributes `mine`; rank 0 combines the contributions (in rank order) with
    /// `combine` and every rank gets the result, of `out_len` values.
    fn exchange(
        &self,
        mine: &[f64],
        out_len: usize,
        combine: impl FnOnce(&[Vec<f64>]) -> Vec<f64>,
    ) -> Result<Vec<f64>> {
        self.check_not_failed()?;
        if self.rank == 0 {
            let mut all = Vec::with_capacity(self.world);
            all.push(mine.to_vec());
            for l in &self.links {
                let v = from_bytes(&self.recv_data(l)?);
                if v.len() != mine.len() {
                    return Err(self.fail(format!(
                        "collective call with {} values on rank 0 but {} on rank {}: every rank \
                         must make the same calls with the same lengths",
                        mine.len(),
                        v.len(),
                        l.peer
                    )));
                }
                all.push(v);
            }
            let out = combine(&all);
            let bytes = to_bytes(&out);
            for l in &self.links {
                send(l, DATA, &bytes).map_err(|e| self.fail(e))?;
            }
            Ok(out)
        } else {
            let l = &self.links[0];
            if let Err(e) = send(l, DATA, &to_bytes(mine)) {
                // Rank 0 may have hung up after telling why: its reason beats a broken pipe.
                return Err(match self.recv_data(l) {
                    Err(why) => why,
                    Ok(_) => self.fail(e),
                });
            }
            let out = from_bytes(&self.recv_data(l)?);
            if out.len() != out_len {
                return Err(self.fail(format!(
                    "collective call with {} values on rank {} but rank 0 answered {} (not \
                     {out_len}): every rank must make the same calls with the same lengths",
                    mine.len(),
                    self.rank,
                    out.len()
                )));
            }
            Ok(out)
        }
    }
}

impl Drop for TcpGroup {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        for l in &self.links {
            if let Ok(w) = l.writer.lock() {
                let _ = w.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let out = self.exchange(buf, buf.len(), |all| {
            // From 0.0 in rank order, as ThreadGroup sums: the same bits.
            let mut acc = vec![0.0f64; all[0].len()];
            for v in all {
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += x;
                }
            }
            acc
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            crate::bail!(
                Config,
                "broadcast from rank {root} in a world of {} ranks: pick a root below {}",
                self.world,
                self.world
            );
        }
        if self.world == 1 {
            return Ok(());
        }
        let mine: Vec<f64> = buf.iter().map(|&v| v as f64).collect();
        let out = self.exchange(&mine, mine.len(), |all| all[root].clone())?;
        for (b, v) in buf.iter_mut().zip(&out) {
            *b = *v as f32;
        }
        Ok(())
    }

    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>> {
        if self.world == 1 {
            return Ok(mine.to_vec());
        }
        self.exchange(mine, mine.len() * self.world, |all| all.concat())
    }

    fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.exchange(&[], 0, |_| Vec::new()).map(|_| ())
    }

    fn abort(&self, why: &str) {
        let _ = self.fail(format!("rank {} failed: {why}", self.rank));
    }
}

/// The wire's little-endian f64s (on a little-endian host, the values' own bytes).
fn to_bytes(v: &[f64]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice::<f64, u8>(v).to_vec()
    } else {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

fn from_bytes(b: &[u8]) -> Vec<f64> {
    let n = b.len() / 8;
    let mut out = vec![0f64; n];
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice_mut::<f64, u8>(&mut out).copy_from_slice(&b[..n * 8]);
    } else {
        for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
            *o = f64::from_le_bytes(c.try_into().expect("chunks of 8"));
        }
    }
    out
}

fn send(l: &Link, kind: u8, payload: &[u8]) -> std::result::Result<(), String> {
    let mut w = l
        .writer
        .lock()
        .map_err(|_| format!("the connection to rank {} is unusable", l.peer))?;
    write_frame(&mut *w, kind, payload).map_err(|e| {
        let peer = l.peer;
        match e.kind() {
            ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof => format!(
                "rank {peer} closed its connection: it exited or was killed (see its own output)"
            ),
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                "rank {peer} stopped taking data for longer than --dist-timeout: it hung, was \
                 stopped, or its machine became unreachable"
            ),
            _ => format!("cannot send to rank {peer}: {e} (it exited, hung or became unreachable)"),
        }
    })
}

fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// The next frame other than a heartbeat from `l`, or why there is none: the peer closed the
/// connection, or sent nothing at all (not even a heartbeat) for `timeout`.
fn recv(l: &Link, timeout: Duration) -> std::result::Result<(u8, Vec<u8>), String> {
    let mut r = l
        .reader
        .lock()
        .map_err(|_| format!("the connection to rank {} is unusable", l.peer))?;
    loop {
        let frame = read_frame(&mut *r);
        if frame.is_ok() {
            l.frames.fetch_add(1, Ordering::Relaxed);
        }
        match frame {
            Ok((BEAT, _)) => continue,
            Ok(f) => return Ok(f),
            Err(e) => return Err(describe_read_error(l.peer, &e, timeout)),
        }
    }
}

fn describe_read_error(peer: usize, e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "rank {peer} sent nothing (not even a heartbeat) for {} s: it hung, was stopped, or \
             its machine became unreachable (the limit is --dist-timeout)",
            timeout.as_secs_f64()
        ),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            format!(
                "rank {peer} closed its connection: it exited or was killed (see its own output)"
            )
        }
        _ => format!("lost the connection to rank {peer}: {e}"),
    }
}

fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a frame of {len} bytes: the stream is corrupt or not carp's"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// Bytes the peer has sent that nobody has read yet (FIONREAD), or None when the socket
/// cannot say; and whether it has closed its end with nothing left to read.
fn pending(fd: std::os::fd::RawFd) -> (Option<i64>, bool) {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points at `n`; `fd` is a socket
    // this group owns for as long as the watchdog runs (the group stops it before closing).
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    let mut byte = 0u8;
    // SAFETY: a peek of at most one byte into `byte`; MSG_DONTWAIT leaves the socket's own
    // (blocking) mode alone. 0 means the peer closed its end and nothing is left to read.
    let peeked = unsafe {
        libc::recv(
            fd,
            &mut byte as *mut u8 as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    ((r == 0).then_some(n as i64), peeked == 0)
}

/// Sends a heartbeat on every link each quarter of the timeout until the group is dropped, and
/// watches the peers: one is alive while its frames are read or its unread bytes grow (its
/// heartbeats pile up while this rank is busy). A peer that closed (for a timeout) or went
/// silent (for one and a half) while this rank has not failed on its own is reported to
/// `on_lost`; the rank's own reads, with the timeout, normally notice first.
fn start_heartbeat(
    links: &[Link],
    timeout: Duration,
    closed: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    on_lost: OnPeerLost,
) -> Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    struct Watch {
        peer: usize,
        writer: Arc<Mutex<TcpStream>>,
        fd: std::os::fd::RawFd,
        frames: Arc<AtomicU64>,
        last: (u64, Option<i64>),
        alive_at: Instant,
        closed_at: Option<Instant>,
    }
    let mut watches: Vec<Watch> = links
        .iter()
        .map(|l| {
            let writer = l.writer.clone();
            let fd = writer.lock().map(|w| w.as_raw_fd()).unwrap_or(-1);
            Watch {
                peer: l.peer,
                writer,
                fd,
                frames: l.frames.clone(),
                last: (0, None),
                alive_at: Instant::now(),
                closed_at: None,
            }
        })
        .collect();
    let every = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let silent_limit = timeout + timeout / 2;
    std::thread::Builder::new()
        .name("carp-heartbeat".into())
        .spawn(move || {
            let tick = Duration::from_millis(25).min(every);
            let mut last = Instant::now();
            while !closed.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                if last.elapsed() < every {
                    continue;
                }
                last = Instant::now();
                for w in &mut watches {
                    // A failed heartbeat is reported by the reads and writes of the
                    // collectives, which know what was going on.
                    if let Ok(mut s) = w.writer.lock() {
                        let _ = write_frame(&mut *s, BEAT, &[]);
                    }
                    let (unread, eof) = pending(w.fd);
                    let now = (w.frames.load(Ordering::Relaxed), unread);
                    if now != w.last {
                        w.last = now;
                        w.alive_at = Instant::now();
                    }
                    if eof {
                        w.closed_at.get_or_insert_with(Instant::now);
                    }
                }
                let noticed = failed.lock().map(|f| f.is_some()).unwrap_or(true);
                if noticed || closed.load(Ordering::Relaxed) {
                    continue;
                }
                let lost = watches.iter().find_map(|w| {
                    if w.closed_at.is_some_and(|t| t.elapsed() > timeout) {
                        Some(format!(
                            "rank {} closed its connection (it exited or was killed) while this \
                             rank was busy; the watchdog ends this rank",
                            w.peer
                        ))
                    } else if w.alive_at.elapsed() > silent_limit {
                        Some(format!(
                            "rank {} sent nothing (not even a heartbeat) for {:.0} s while this \
                             rank was busy: it hung, was stopped, or its machine became \
                             unreachable; the watchdog ends this rank",
                            w.peer,
                            silent_limit.as_secs_f64()
                        ))
                    } else {
                        None
                    }
                });
                if let Some(why) = lost {
                    on_lost(why);
                    return;
                }
            }
        })
        .map_err(|e| Error::Msg(format!("cannot start the heartbeat thread: {e}")))?;
    Ok(())
}

fn link(peer: usize, stream: TcpStream, timeout: Duration) -> Result<Link> {
    let io =
        |e: std::io::Error| Error::Msg(format!("configuring the connection to rank {peer}: {e}"));
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let writer = stream.try_clone().map_err(io)?;
    Ok(Link {
        peer,
        reader: Mutex::new(stream),
        writer: Arc::new(Mutex::new(writer)),
        frames: Arc::new(AtomicU64::new(0)),
    })
}

/// Rank 0's side of the rendezvous.
fn gather_ranks(rv: &Rendezvous, identity: &Identity) -> Result<Vec<Link>> {
    let listener = TcpListener::bind(("0.0.0.0", rv.master_port)).map_err(|e| {
        if e.kind() == ErrorKind::AddrInUse {
            Error::Config(format!(
                "rank 0 cannot listen on port {}: it is in use on this machine (another run or \
                 program); pick another --master-port (or MASTER_PORT)",
                rv.master_port
            ))
        } else {
            Error::Config(format!(
                "rank 0 cannot listen on port {}: {e}; pick another --master-port",
                rv.master_port
            ))
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Msg(format!("rendezvous listener: {e}")))?;
    let deadline = Instant::now() + rv.timeout;
    let mut arrived: Vec<Option<Link>> = (1..rv.world).map(|_| None).collect();
    while arrived.iter().any(Option::is_none) {
        let (stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = arrived
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| a.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    let why = format!(
                        "rendezvous timed out after {} s: rank(s) {} of {} never arrived at port \
                         {} (are they started, with the same --master-addr and --master-port? \
                         raise --dist-timeout if they start slowly)",
                        rv.timeout.as_secs_f64(),
                        missing.join(", "),
                        rv.world,
                        rv.master_port
                    );
                    refuse_all(&arrived, &why);
                    return Err(Error::Msg(why));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(Error::Msg(format!("rendezvous: accepting a rank: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        // A stray connection (no magic, or silence) is dropped; the wait goes on.
        let hello_wait = rv.timeout.min(Duration::from_secs(10));
        let Some((stream, hello)) = read_hello(stream, hello_wait) else {
            continue;
        };
        let l = link(hello.rank, stream, rv.timeout)?;
        let verdict = check_hello(rv, identity, &hello, &arrived);
        if let Err(why) = verdict {
            let _ = send(&l, ABORT, why.as_bytes());
            refuse_all(&arrived, &why);
            let missing = arrived.iter().filter(|a| a.is_none()).count() - 1;
            refuse_late_arrivals(&listener, &why, missing);
            return Err(Error::Config(format!("{why} (connection from {from})")));
        }
        arrived[hello.rank - 1] = Some(l);
    }
    let links: Vec<Link> = arrived.into_iter().flatten().collect();
    for l in &links {
        send(l, WELCOME, &[]).map_err(Error::Msg)?;
    }
    Ok(links)
}

/// After a refusal, tells the ranks still on their way why (for a few seconds), so that every
/// rank reports the cause rather than a closed connection.
fn refuse_late_arrivals(listener: &TcpListener, why: &str, mut missing: usize) {
    let until = Instant::now() + Duration::from_secs(3);
    while missing > 0 && Instant::now() < until {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if let Some((mut stream, _)) = read_hello(stream, Duration::from_secs(1)) {
                    let _ = write_frame(&mut stream, ABORT, why.as_bytes());
                    missing -= 1;
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn refuse_all(arrived: &[Option<Link>], why: &str) {
    for l in arrived.iter().flatten() {
        let _ = send(l, ABORT, why.as_bytes());
    }
}

fn read_hello(mut stream: TcpStream, wait: Duration) -> Option<(TcpStream, Hello)> {
    stream.set_read_timeout(Some(wait)).ok()?;
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).ok()?;
    if &magic != MAGIC {
        return None;
    }
    match read_frame(&mut stream) {
        Ok((HELLO, p)) => serde_json::from_slice(&p).ok().map(|h| (stream, h)),
        _ => None,
    }
}

/// Whether `hello` may join: the same world, a rank not yet taken, the same binary and the same
/// configuration as rank 0; otherwise why not, naming the rank and the field.
fn check_hello(
    rv: &Rendezvous,
    identity: &Identity,
    hello: &Hello,
    arrived: &[Option<Link>],
) -> std::result::Result<(), String> {
    let r = hello.rank;
    if hello.world != rv.world {
        return Err(format!(
            "rank {r} was started with world size {} but rank 0 with {}: start every rank with \
             the same world size",
            hello.world, rv.world
        ));
    }
    if r == 0 || r >= rv.world {
        return Err(format!(
            "a second rank 0 (or a rank {r} outside 0..{}) arrived: every rank needs its own \
             RANK",
            rv.world
        ));
    }
    if arrived[r - 1].is_some() {
        return Err(format!(
            "two processes claim rank {r}: every rank needs its own RANK"
        ));
    }
    if hello.identity.binary != identity.binary {
        return Err(format!(
            "rank {r} runs another carp binary ({}) than rank 0 ({}): install the same build on \
             every machine",
            hello.identity.binary, identity.binary
        ));
    }
    if let Some((field, theirs, ours)) = first_difference(&hello.identity.config, &identity.config)
    {
        return Err(format!(
            "rank {r} was started with another configuration than rank 0: `{field}` is {theirs} \
             on rank {r} but {ours} on rank 0; start every rank with the same flags"
        ));
    }
    Ok(())
}

/// The first field (a dotted path) where two JSON values differ, with both values.
pub fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                first_difference(va, vb).map(|(f, p, q)| {
                    let path = if f.is_empty() {
                        k.clone()
                    } else {
                        format!("{k}.{f}")
                    };
                    (path, p, q)
                })
            })
        }
        _ if a == b => None,
        _ => Some((String::new(), a.to_string(), b.to_string())),
    }
}

/// Another rank's side of the rendezvous: connect to rank 0 (retrying until the deadline, as
/// rank 0 may start later), introduce itself, and wait to be welcomed or refused.
fn reach_master(rv: &Rendezvous, identity: &Identity) -> Result<Link> {
    let deadline = Instant::now() + rv.timeout;
    let target = format!("{}:{}", rv.master_addr, rv.master_port);
    let mut stream = connect_until(&target, deadline).map_err(|last| {
        Error::Msg(format!(
            "rank {} cannot reach rank 0 at {target} within {} s ({last}): is rank 0 started, \
             is --master-addr (MASTER_ADDR) its host and reachable from here, is --master-port \
             (MASTER_PORT) the same? (raise --dist-timeout if it starts slowly)",
            rv.rank,
            rv.timeout.as_secs_f64()
        ))
    })?;
    let hello = Hello {
        rank: rv.rank,
        world: rv.world,
        identity: identity.clone(),
    };
    let body = serde_json::to_vec(&hello).map_err(|e| Error::Msg(e.to_string()))?;
    stream
        .write_all(MAGIC)
        .and_then(|_| write_frame(&mut stream, HELLO, &body))
        .map_err(|e| {
            Error::Msg(format!(
                "rank {}: introducing itself to rank 0 at {target}: {e}",
                rv.rank
            ))
        })?;
    // Rank 0 answers once every rank has arrived, within its own timeout.
    let l = link(0, stream, rv.timeout + Duration::from_secs(5))?;
    let answer = recv(&l, rv.timeout);
    let _ = l
        .reader
        .lock()
        .map(|r| r.set_read_timeout(Some(rv.timeout)));
    match answer {
        Ok((WELCOME, _)) => Ok(l),
        Ok((ABORT, why)) => Err(Error::Config(format!(
            "rank 0 refused the run: {}",
            String::from_utf8_lossy(&why)
        ))),
        Ok((kind, _)) => Err(Error::Msg(format!(
            "rank 0 at {target} answered the rendezvous with message kind {kind}: is it a carp \
             run of the same version?"
        ))),
        Err(e) => Err(Error::Msg(format!(
            "rendezvous with rank 0 at {target}: {e}"
        ))),
    }
}

/// A connection to `target`, retried until `deadline`; the last failure otherwise.
fn connect_until(target: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let mut last = String::from("no attempt");
    loop {
        match target.to_socket_addrs() {
            Err(e) => last = format!("cannot resolve it: {e}"),
            Ok(addrs) => {
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let attempt = left.clamp(Duration::from_millis(100), Duration::from_secs(2));
                    match TcpStream::connect_timeout(&a, attempt) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e.to_string(),
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::collective::tests::values;
    use crate::device::collective::ThreadGroup;

    /// A join whose watchdog only records (the tests' own assertions see the errors): the
    /// default action would end the test process.
    fn join_quiet(rv: &Rendezvous, id: &Identity) -> Result<TcpGroup> {
        TcpGroup::join_watched(rv, id, Arc::new(|_| {}))
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn identity(lr: f64) -> Identity {
        Identity {
            config: serde_json::json!({"batch": 16, "lr": lr, "model": {"arch": "tiny"}}),
            binary: "carp test".into(),
        }
    }

    fn rv(rank: usize, world: usize, port: u16, timeout_ms: u64) -> Rendezvous {
        Rendezvous {
            rank,
            world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// Runs `f(rank, joined group)` on `world` threads that meet on a fresh port, each with
    /// the identity `ident(rank)`; results in rank order.
    fn on_ranks<R: Send + 'static>(
        world: usize,
        timeout_ms: u64,
        ident: impl Fn(usize) -> Identity,
        f: impl Fn(usize, Result<TcpGroup>) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let port = free_port();
        let f = Arc::new(f);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (f, id) = (f.clone(), ident(r));
                std::thread::spawn(move || f(r, join_quiet(&rv(r, world, port, timeout_ms), &id)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_give_the_thread_groups_bits() {
        for world in [2, 4] {
            let n = 41;
            let tcp = on_ranks(
                world,
                10_000,
                |_| identity(0.6),
                move |r, g| {
                    let g = g.unwrap();
                    assert_eq!((g.rank(), g.world_size()), (r, world));
                    let mut v = values(r, n);
                    g.all_reduce_sum(&mut v).unwrap();
                    let mut b = values(r, 5);
                    g.broadcast(&mut b, world - 1).unwrap();
                    g.barrier().unwrap();
                    let gathered = g.all_gather_f64(&[r as f64; 2]).unwrap();
                    (v, b, gathered)
                },
            );
            let threads: Vec<_> = ThreadGroup::ranks(world)
                .unwrap()
                .into_iter()
                .enumerate()
                .map(|(r, c)| {
                    std::thread::spawn(move || {
                        let mut v = values(r, n);
                        c.all_reduce_sum(&mut v).unwrap();
                        v
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            let direct: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| values(r, n)[i] as f64).sum::<f64>() as f32)
                .collect();
            for (r, (v, b, gathered)) in tcp.iter().enumerate() {
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(v), bits(&threads[r]), "world {world} rank {r}");
                assert_eq!(v, &direct);
                assert_eq!(b, &values(world - 1, 5));
                let want: Vec<f64> = (0..world).flat_map(|q| [q as f64; 2]).collect();
                assert_eq!(gathered, &want);
            }
        }
    }

    #[test]
    fn a_rank_with_another_configuration_is_refused_by_name_and_field() {
        let got = on_ranks(
            3,
            10_000,
            |r| identity(if r == 2 { 0.5 } else { 0.6 }),
            |_, g| g.err().map(|e| e.to_string()),
        );
        for (r, e) in got.iter().enumerate() {
            let e = e.as_ref().unwrap_or_else(|| panic!("rank {r} joined"));
            assert!(e.contains("rank 2") && e.contains("`lr`"), "rank {r}: {e}");
            assert!(e.contains("0.5") && e.contains("0.6"), "rank {r}: {e}");
        }
    }

    #[test]
    fn another_binary_is_refused() {
        let got = on_ranks(
            2,
            10_000,
            |r| Identity {
                binary: format!("carp build {r}"),
                ..identity(0.6)
            },
            |_, g| g.err().map(|e| e.to_string()).unwrap_or_default(),
        );
        for e in got {
            assert!(e.contains("rank 1 runs another carp binary"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_with_its_number() {
        let port = free_port();
        let t0 = Instant::now();
        let e = join_quiet(&rv(0, 3, port, 400), &identity(0.6))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) 1, 2 of 3 never arrived"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_unreachable_master_and_a_port_in_use_are_clear_errors() {
        let port = free_port();
        let e = join_quiet(&rv(1, 2, port, 300), &identity(0.6))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("rank 1 cannot reach rank 0 at 127.0.0.1:"),
            "{e}"
        );
        let busy = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let e = join_quiet(&rv(0, 2, port, 300), &identity(0.6))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in use"), "{e}");
    }

    #[test]
    fn a_rank_that_exits_is_named_by_the_others() {
        let got = on_ranks(
            3,
            10_000,
            |_| identity(0.6),
            |r, g| {
                let g = g.unwrap();
                let mut v = vec![1.0f32; 3];
                g.all_reduce_sum(&mut v).unwrap();
                if r == 1 {
                    drop(g); // the process exits: its connection closes
                    return String::new();
                }
                let e = g.all_reduce_sum(&mut v).unwrap_err().to_string();
                // Later calls fail at once.
                assert!(g.barrier().is_err());
                e
            },
        );
        assert!(
            got[0].contains("rank 1 closed its connection"),
            "{}",
            got[0]
        );
        assert!(
            got[2].contains("rank 1 closed its connection"),
            "{}",
            got[2]
        );
    }

    #[test]
    fn a_failing_rank_tells_the_others_why() {
        let got = on_ranks(
            3,
            10_000,
            |_| identity(0.6),
            |r, g| {
                let g = g.unwrap();
                if r == 2 {
                    g.abort("disk full");
                    return String::new();
                }
                let mut v = vec![1.0f32; 3];
                g.all_reduce_sum(&mut v).unwrap_err().to_string()
            },
        );
        for e in &got[..2] {
            assert!(e.contains("rank 2 failed: disk full"), "{e}");
        }
    }

    #[test]
    fn a_silent_rank_is_reported_as_hung_after_the_timeout() {
        let port = free_port();
        let rank0 = std::thread::spawn(move || {
            let g = join_quiet(&rv(0, 2, port, 500), &identity(0.6)).unwrap();
            let t0 = Instant::now();
            let e = g.barrier().unwrap_err().to_string();
            (e, t0.elapsed())
        });
        // Kept open, not a word sent: not even heartbeats.
        let _rank1 = silent_rank_one(port);
        let (e, waited) = rank0.join().unwrap();
        assert!(e.contains("rank 1 sent nothing"), "{e}");
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5));
    }

    /// Rank 1 by hand: joins rank 0 on `port`, then does nothing more (a stopped process).
    fn silent_rank_one(port: u16) -> TcpStream {
        let mut s = connect_until(
            &format!("127.0.0.1:{port}"),
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        let hello = serde_json::to_vec(&Hello {
            rank: 1,
            world: 2,
            identity: identity(0.6),
        })
        .unwrap();
        s.write_all(MAGIC).unwrap();
        write_frame(&mut s, HELLO, &hello).unwrap();
        assert_eq!(read_frame(&mut s).unwrap().0, WELCOME);
        s
    }

    #[test]
    fn the_watchdog_reports_a_lost_peer_while_the_rank_is_busy() {
        for close in [false, true] {
            let port = free_port();
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            let tx = Mutex::new(tx);
            let rank0 = std::thread::spawn(move || {
                let on_lost: OnPeerLost = Arc::new(move |why| {
                    let _ = tx.lock().unwrap().send(why);
                });
                // Joined, then busy (no collective call) for longer than the watchdog needs.
                let g =
                    TcpGroup::join_watched(&rv(0, 2, port, 400), &identity(0.6), on_lost).unwrap();
                std::thread::sleep(Duration::from_secs(3));
                drop(g);
            });
            let s = silent_rank_one(port);
            if close {
                drop(s);
                let why = rx.recv_timeout(Duration::from_secs(2)).expect("no report");
                assert!(why.contains("rank 1 closed its connection"), "{why}");
            } else {
                let t0 = Instant::now();
                let why = rx.recv_timeout(Duration::from_secs(3)).expect("no report");
                assert!(why.contains("rank 1 sent nothing"), "{why}");
                assert!(
                    t0.elapsed() >= Duration::from_millis(500),
                    "{:?}",
                    t0.elapsed()
                );
                drop(s);
            }
            rank0.join().unwrap();
        }
    }

    #[test]
    fn the_watchdog_stays_quiet_while_busy_ranks_send_heartbeats() {
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let handles: Vec<_> = (0..2)
            .map(|r| {
                let tx = Mutex::new(tx.clone());
                std::thread::spawn(move || {
                    let on_lost: OnPeerLost = Arc::new(move |why| {
                        let _ = tx.lock().unwrap().send(why);
                    });
                    let g = TcpGroup::join_watched(&rv(r, 2, port, 300), &identity(0.6), on_lost)
                        .unwrap();
                    // Both busy for five timeouts (a long evaluation on rank 0, say), then
                    // back in step.
                    std::thread::sleep(Duration::from_millis(1500));
                    g.barrier().unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        drop(tx);
        assert_eq!(rx.recv().ok(), None, "the watchdog fired on live ranks");
    }

    #[test]
    fn field_differences_name_the_dotted_path() {
        let a = serde_json::json!({"model": {"head": {"k": 4}}, "lr": 1});
        let b = serde_json::json!({"model": {"head": {"k": 8}}, "lr": 1});
        assert_eq!(
            first_difference(&a, &b),
            Some(("model.head.k".into(), "4".into(), "8".into()))
        );
        assert_eq!(first_difference(&a, &a), None);
    }
}
