// SPDX-License-Identifier: GPL-2.0

//! rvmm: a VT-x hypervisor with shadow paging, as a Rust-for-Linux module.
//!
//! This file is the thin top: the module, the `/dev/rvmm` misc device and the ioctl
//! dispatch. VMX itself lives in [`vmx`]; the ABI in the `rvmm_uapi` crate; logic that
//! needs no ring 0 in `rvmm_core`.

use kernel::{
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
    uaccess::{UserPtr, UserSlice},
};
use rvmm_uapi as uapi;

mod vmx;

module! {
    type: RvmmModule,
    name: "rvmm",
    authors: ["rvmm developers"],
    description: "rvmm: a VT-x hypervisor with shadow paging",
    license: "GPL",
}

#[pin_data]
struct RvmmModule {
    // Dropped first: no file can be opened once VMX goes away.
    #[pin]
    _misc: MiscDeviceRegistration<RvmmFile>,
    _vmx: vmx::VmxOn,
}

impl kernel::InPlaceModule for RvmmModule {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            // Initialised in this order: VMX on every CPU, then the device.
            _vmx: enable_vmx()?,
            _misc <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"rvmm" }),
        })
    }
}

fn enable_vmx() -> Result<vmx::VmxOn> {
    if let Err(why) = vmx::check_support() {
        pr_err!("not loading: {}\n", why.explain());
        return Err(if why.is_absent() { ENODEV } else { EOPNOTSUPP });
    }
    let on = vmx::VmxOn::enable().inspect_err(|e| {
        pr_err!(
            "not loading: VMX could not be enabled on every CPU ({:?})\n",
            e
        );
    })?;
    let caps = vmx::read_caps();
    pr_info!(
        "VMX on (VMCS revision {:#x}, {} bytes), /dev/rvmm ready, API version {}\n",
        caps.vmcs_revision,
        caps.vmcs_size,
        uapi::RVMM_API_VERSION
    );
    Ok(on)
}

/// An open `/dev/rvmm`. VMs will hang off it.
struct RvmmFile;

#[vtable]
impl MiscDevice for RvmmFile {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        Ok(KBox::new(RvmmFile, GFP_KERNEL)?)
    }

    fn ioctl(_me: &RvmmFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        if uapi::ioc_type(cmd) != uapi::RVMM_IOCTL_TYPE {
            return Err(ENOTTY);
        }
        // Match on the number alone so that a known ioctl with a wrong size or direction
        // is EINVAL (a caller built against another ABI), and an unknown one ENOTTY.
        let expect = match uapi::ioc_nr(cmd) {
            n if n == uapi::ioc_nr(uapi::RVMM_GET_API_VERSION) => uapi::RVMM_GET_API_VERSION,
            n if n == uapi::ioc_nr(uapi::RVMM_GET_VMX_CAPS) => uapi::RVMM_GET_VMX_CAPS,
            n if n == uapi::ioc_nr(uapi::RVMM_GET_STATUS) => uapi::RVMM_GET_STATUS,
            _ => return Err(ENOTTY),
        };
        if cmd != expect {
            return Err(EINVAL);
        }
        let user = UserSlice::new(UserPtr::from_addr(arg), uapi::ioc_size(cmd));
        match cmd {
            uapi::RVMM_GET_API_VERSION => Ok(uapi::RVMM_API_VERSION as isize),
            uapi::RVMM_GET_VMX_CAPS => write_struct(user, &vmx::read_caps()),
            uapi::RVMM_GET_STATUS => write_struct(user, &vmx::check_all_cpus()?),
            _ => Err(ENOTTY),
        }
    }
}

/// Copies an ABI structure out to userspace (EFAULT on a bad pointer).
fn write_struct<T: uapi::AbiStruct>(user: UserSlice, value: &T) -> Result<isize> {
    let bytes = core::mem::size_of::<T>();
    // SAFETY: every ABI structure is `#[repr(C)]` without padding (checked at compile
    // time by `abi_struct!`), so all of its `bytes` bytes are initialised.
    let slice =
        unsafe { core::slice::from_raw_parts(core::ptr::from_ref(value).cast::<u8>(), bytes) };
    user.writer().write_slice(slice)?;
    Ok(0)
}
