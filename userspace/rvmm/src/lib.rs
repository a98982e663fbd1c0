// SPDX-License-Identifier: GPL-2.0

//! `rvmm`: safe wrappers over the `/dev/rvmm` ioctls, with typed errors.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub use rvmm_uapi as uapi;
pub use rvmm_uapi::{Status, VmxCaps, RVMM_API_VERSION};

/// The device node the module registers.
pub const DEFAULT_DEVICE: &str = "/dev/rvmm";

/// What went wrong, and where.
#[derive(Debug)]
pub enum Error {
    /// The device could not be opened.
    Open {
        /// Device path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An ioctl failed.
    Ioctl {
        /// Name of the ioctl.
        op: &'static str,
        /// The OS error (errno).
        source: io::Error,
    },
    /// The module speaks another ABI version than this library.
    ApiMismatch {
        /// Version the module reported.
        module: u32,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { path, source } => {
                write!(f, "cannot open {}: {source}", path.display())?;
                if source.kind() == io::ErrorKind::NotFound {
                    write!(f, " (is rvmm.ko loaded? `insmod rvmm.ko`, then see `dmesg` if it refused)")?;
                }
                Ok(())
            }
            Error::Ioctl { op, source } => write!(f, "{op} failed: {source}"),
            Error::ApiMismatch { module } => write!(
                f,
                "rvmm.ko speaks ABI version {module}, this program version {RVMM_API_VERSION}: rebuild one of them"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. } | Error::Ioctl { source, .. } => Some(source),
            Error::ApiMismatch { .. } => None,
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An open `/dev/rvmm`.
#[derive(Debug)]
pub struct Rvmm {
    file: File,
}

impl Rvmm {
    /// Opens the device at `path` and checks that it speaks this library's ABI.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let rvmm = Rvmm { file };
        let module = rvmm.api_version()?;
        if module != RVMM_API_VERSION {
            return Err(Error::ApiMismatch { module });
        }
        Ok(rvmm)
    }

    /// The module's ABI version.
    pub fn api_version(&self) -> Result<u32> {
        // SAFETY: RVMM_GET_API_VERSION takes no argument.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                uapi::RVMM_GET_API_VERSION as _,
                0usize,
            )
        };
        if r < 0 {
            return Err(Error::Ioctl {
                op: "RVMM_GET_API_VERSION",
                source: io::Error::last_os_error(),
            });
        }
        Ok(r as u32)
    }

    /// The CPU's VMX capabilities as the module reads them.
    pub fn vmx_caps(&self) -> Result<VmxCaps> {
        self.read_struct("RVMM_GET_VMX_CAPS", uapi::RVMM_GET_VMX_CAPS)
    }

    /// Checks VMX operation on every online CPU.
    pub fn status(&self) -> Result<Status> {
        self.read_struct("RVMM_GET_STATUS", uapi::RVMM_GET_STATUS)
    }

    fn read_struct<T: Default>(&self, op: &'static str, cmd: u32) -> Result<T> {
        let mut value = T::default();
        // SAFETY: `cmd` is an _IOR ioctl whose size is `size_of::<T>()` (uapi), and
        // `value` is a valid, writable `T`.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd as _, &mut value as *mut T) };
        if r < 0 {
            return Err(Error::Ioctl {
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(value)
    }

    /// The raw file descriptor, for tests that issue malformed ioctls on purpose.
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}
