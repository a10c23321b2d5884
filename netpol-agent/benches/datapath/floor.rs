//! The floor: a two-instruction TC program, loaded without an object file.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::programs::SchedClassifier;

/// `BPF_PROG_LOAD` attributes up to `prog_name` (the kernel zero-fills the rest).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `BPF_OBJ_PIN` attributes.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// Loads `r0 = -1 (TC_ACT_UNSPEC); exit` as a SchedClassifier, pins it at `pin` and
/// opens it through aya, so it runs through exactly the same test-run path as netpol.
#[allow(dead_code)] // Each user includes this file and calls what it needs.
pub fn load_empty_program(pin: &Path) -> std::io::Result<SchedClassifier> {
    load_constant_program(pin, "floor", -1)
}

/// Loads `r0 = <verdict>; exit` (a TC program that returns `verdict` for every packet)
/// named `name` (at most 15 bytes), pins it at `pin` and opens it through aya. Also
/// used by `tests/composition.rs` for a program that lets everything through.
#[allow(dead_code)] // Each user includes this file and calls what it needs.
pub fn load_constant_program(
    pin: &Path,
    name: &str,
    verdict: i32,
) -> std::io::Result<SchedClassifier> {
    let imm = verdict.to_le_bytes();
    // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }
    let insns: [[u8; 8]; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm = verdict
        [0xb7, 0x00, 0, 0, imm[0], imm[1], imm[2], imm[3]],
        // BPF_JMP | BPF_EXIT
        [0x95, 0x00, 0, 0, 0, 0, 0, 0],
    ];
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
    };
    // SAFETY: `attr` and everything it points to outlive the call; the kernel reads
    // `size_of::<ProgLoadAttr>()` bytes and treats the rest of `union bpf_attr` as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).expect("no NUL");
    let attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &attr as *const ObjPinAttr,
            std::mem::size_of::<ObjPinAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(fd);
    SchedClassifier::from_pin(pin).map_err(std::io::Error::other)
}
