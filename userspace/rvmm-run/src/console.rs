// SPDX-License-Identifier: GPL-2.0

//! The guest's serial console on rvmm-run's terminal: stdin goes to COM1's receiver (the
//! terminal in raw mode, so that keys such as Ctrl-C reach the guest), and Ctrl-A x
//! quits, as with QEMU's `-serial mon:stdio`. Ctrl-A Ctrl-A sends one Ctrl-A.

use std::sync::OnceLock;
use std::time::Duration;

const CTRL_A: u8 = 0x01;

/// What a byte of input means.
#[derive(Debug, PartialEq, Eq)]
pub enum Key {
    /// Bytes for the guest.
    Send(u8),
    /// Ctrl-A x: end the run.
    Quit,
    /// Nothing (the first byte of an escape, or an unknown escape).
    None,
}

/// The Ctrl-A escape state of the input stream.
#[derive(Default)]
pub struct Escape {
    pending: bool,
}

impl Escape {
    pub fn key(&mut self, b: u8) -> Key {
        if std::mem::take(&mut self.pending) {
            return match b {
                b'x' | b'X' => Key::Quit,
                CTRL_A => Key::Send(CTRL_A),
                _ => Key::None,
            };
        }
        if b == CTRL_A {
            self.pending = true;
            return Key::None;
        }
        Key::Send(b)
    }
}

/// The terminal's settings before raw mode, restored at exit.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

extern "C" fn restore_terminal() {
    if let Some(t) = SAVED.get() {
        // SAFETY: `t` is a termios that tcgetattr filled for fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}

/// Puts stdin's terminal in raw mode and restores it when the process exits.
fn raw_mode() {
    // SAFETY: termios is plain data; tcgetattr fills it for fd 0 (checked: it is a tty).
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 || SAVED.set(t).is_err() {
        return;
    }
    make_raw(&mut t);
    // SAFETY: restore_terminal is an extern "C" fn with no arguments; `t` is valid.
    unsafe {
        libc::atexit(restore_terminal);
        libc::tcsetattr(0, libc::TCSANOW, &t);
    }
}

/// Raw input: no echo, no line editing, no signals or flow control from keys, 8-bit
/// bytes one at a time; output processing stays (the host terminal still turns the
/// guest's and rvmm-run's newlines into CR LF).
fn make_raw(t: &mut libc::termios) {
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cflag = (t.c_cflag & !(libc::CSIZE | libc::PARENB)) | libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
}

/// Starts the input thread: bytes from stdin go to `send` (which returns how many the
/// UART took; the rest waits until the guest reads its FIFO) until stdin ends.
pub fn spawn(send: impl Fn(&[u8]) -> usize + Send + 'static) -> Result<(), String> {
    // SAFETY: isatty only queries fd 0.
    let tty = unsafe { libc::isatty(0) } == 1;
    if tty {
        raw_mode();
        eprintln!("rvmm-run: the guest's serial console; Ctrl-A x quits");
    }
    std::thread::Builder::new()
        .name("rvmm-console".into())
        .spawn(move || {
            let mut esc = Escape::default();
            let mut buf = [0u8; 256];
            loop {
                // SAFETY: reads into `buf`, a live local of the given length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                if n <= 0 {
                    return;
                }
                for &b in &buf[..n as usize] {
                    match esc.key(b) {
                        Key::Send(b) => {
                            while send(&[b]) == 0 {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                        Key::Quit => {
                            restore_terminal();
                            eprintln!("\r\nrvmm-run: quit (Ctrl-A x)");
                            std::process::exit(0);
                        }
                        Key::None => {}
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("console thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_mode_on_a_pseudo_terminal() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors; the name/termios/winsize are optional.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: plain data, filled by tcgetattr on the new terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `slave` is an open terminal; `t` a live local.
        assert_eq!(unsafe { libc::tcgetattr(slave, &mut t) }, 0);
        assert_ne!(
            t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
            0,
            "a cooked tty"
        );
        make_raw(&mut t);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::tcsetattr(slave, libc::TCSANOW, &t) }, 0);
        // Typed on the "keyboard": a line-editing key, Ctrl-C and a newline arrive as
        // they are, at once, without an echo back.
        let typed = b"a\x7f\x03\r";
        // SAFETY: writes/reads with live buffers of the given lengths.
        unsafe {
            assert_eq!(libc::write(master, typed.as_ptr().cast(), typed.len()), 4);
            let mut got = [0u8; 16];
            let n = libc::read(slave, got.as_mut_ptr().cast(), got.len());
            assert_eq!(&got[..n as usize], typed);
            let mut fl = libc::fcntl(master, libc::F_GETFL);
            fl |= libc::O_NONBLOCK;
            libc::fcntl(master, libc::F_SETFL, fl);
            assert_eq!(
                libc::read(master, got.as_mut_ptr().cast(), got.len()),
                -1,
                "no echo"
            );
            libc::close(master);
            libc::close(slave);
        }
    }

    #[test]
    fn ctrl_a_escapes() {
        let mut e = Escape::default();
        let keys: Vec<Key> = b"ab\x01\x01c\x01qd\x01x"
            .iter()
            .map(|&b| e.key(b))
            .collect();
        assert_eq!(
            keys,
            [
                Key::Send(b'a'),
                Key::Send(b'b'),
                Key::None,
                Key::Send(CTRL_A),
                Key::Send(b'c'),
                Key::None,
                Key::None,
                Key::Send(b'd'),
                Key::None,
                Key::Quit
            ]
        );
    }
}
