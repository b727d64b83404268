//! The NoCloud seed: a directory (for a Pi's boot partition or a USB stick labelled
//! CIDATA) or an ISO image labelled `cidata` (for a VM's second drive).

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{DeviceProvision, Error, invalid};

/// The agent binary's name on the seed.
pub const AGENT_FILE: &str = "iot-agent";
/// The enrollment's name on the seed (0600): the install script takes it off, and
/// removes it from a writable seed.
pub const ENROLLMENT_FILE: &str = "iot-enrollment.json";
/// The CA certificate's name on the seed.
pub const CA_FILE: &str = "iot-ca.pem";

pub(crate) fn check_file_name(field: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && ![
            "user-data",
            "meta-data",
            "network-config",
            AGENT_FILE,
            ENROLLMENT_FILE,
            CA_FILE,
        ]
        .contains(&name);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a plain file name for the seed"),
        ))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// sha256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// The architecture an ELF executable is built for (x86_64, aarch64, ...), read
/// from its header, so a seed never carries a binary the device cannot run
/// unnoticed.
pub fn elf_arch(path: &Path) -> Result<&'static str, Error> {
    let mut head = Vec::with_capacity(20);
    let f = std::fs::File::open(path).map_err(io(path))?;
    f.take(20).read_to_end(&mut head).map_err(io(path))?;
    if head.len() < 20 || &head[..4] != b"\x7fELF" || head[5] != 1 {
        return Err(invalid(
            "agent",
            format!("{} is not a little-endian ELF executable", path.display()),
        ));
    }
    Ok(match u16::from_le_bytes([head[18], head[19]]) {
        62 => "x86_64",
        183 => "aarch64",
        40 => "arm",
        243 => "riscv64",
        _ => "an unknown architecture",
    })
}

fn write(path: &Path, content: &str, mode: u32) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    std::io::Write::write_all(&mut f, content.as_bytes()).map_err(io(path))?;
    // An existing file keeps its old mode through open(); the secret must not.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Writes the seed into `dir` (created 0700): `user-data` (0600), `meta-data`,
/// `network-config` if set, the enrollment (0600) and CA files if set, the agent
/// binary and the image archives. The agent's sha256 is taken from `agent`
/// itself. Returns the files written, in seed order.
pub fn write_seed_dir(
    provision: &DeviceProvision,
    agent: &Path,
    images: &[PathBuf],
    dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    let mut p = provision.clone();
    p.agent_sha256 = sha256_file(agent)?;
    p.preload_images = images
        .iter()
        .map(|i| {
            i.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let user_data = p.user_data()?;
    let network = p.network_config()?;

    // A directory of ours is private; an existing one (a Pi's mounted boot
    // partition, say) keeps its mode: only the secret file is made 0600.
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    let mut files = Vec::new();
    let mut put = |name: &str, content: &str, mode: u32| -> Result<(), Error> {
        let path = dir.join(name);
        write(&path, content, mode)?;
        files.push(path);
        Ok(())
    };
    put("user-data", &user_data, 0o600)?;
    put("meta-data", &p.meta_data_for(&user_data), 0o644)?;
    let optional: [(&str, Option<String>, u32); 3] = [
        ("network-config", network, 0o644),
        (ENROLLMENT_FILE, p.enrollment_file(), 0o600),
        (CA_FILE, p.ca_pem.clone(), 0o644),
    ];
    for (name, content, mode) in optional {
        match content {
            Some(text) => put(name, &text, mode)?,
            None => {
                let stale = dir.join(name);
                if stale.exists() {
                    std::fs::remove_file(&stale).map_err(io(&stale))?;
                }
            }
        }
    }
    for (src, name) in std::iter::once((agent, AGENT_FILE)).chain(
        images
            .iter()
            .map(PathBuf::as_path)
            .zip(&p.preload_images)
            .map(|(s, n)| (s, n.as_str())),
    ) {
        let dst = dir.join(name);
        std::fs::copy(src, &dst).map_err(io(src))?;
        files.push(dst);
    }
    Ok(files)
}

/// Packs a seed directory's files into an ISO 9660 image labelled `cidata` (what
/// cloud-init's NoCloud looks for), with `genisoimage` (as `cloud-localds` does).
pub fn write_seed_iso(files: &[PathBuf], iso: &Path) -> Result<(), Error> {
    // Created 0600 before genisoimage writes the secret into it.
    write(iso, "", 0o600)?;
    let out = Command::new("genisoimage")
        .args([
            "-quiet",
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
            "-input-charset",
            "utf-8",
            "-output",
        ])
        .arg(iso)
        .args(files)
        .output()
        .map_err(|e| Error::Tool {
            tool: "genisoimage".into(),
            detail: format!("{e} (Debian package genisoimage)"),
        })?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "genisoimage".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    std::fs::set_permissions(iso, std::fs::Permissions::from_mode(0o600)).map_err(io(iso))
}

/// Writes a seed's files into a FAT image labelled `CIDATA` (mode 0600): a writable
/// seed, as a USB stick or a Pi's boot partition is, from which the install script
/// removes the enrollment. Uses `mkfs.vfat` (dosfstools) and `mcopy` (mtools).
pub fn write_seed_vfat(files: &[PathBuf], image: &Path) -> Result<(), Error> {
    let mut bytes: u64 = 0;
    for f in files {
        bytes += std::fs::metadata(f).map_err(io(f))?.len();
    }
    // Room for the FAT, directory entries and cluster slack.
    let kib = (bytes / 1024) * 5 / 4 + 16 * 1024;
    write(image, "", 0o600)?;
    std::fs::remove_file(image).map_err(io(image))?;
    let tool = |name: &str, args: &[&std::ffi::OsStr]| -> Result<(), Error> {
        let out = Command::new(name).args(args).output().map_err(|e| Error::Tool {
            tool: name.into(),
            detail: format!("{e} (Debian packages dosfstools and mtools)"),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::Tool {
                tool: name.into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    };
    let kib = kib.to_string();
    tool(
        "mkfs.vfat",
        &[
            "-n".as_ref(),
            "CIDATA".as_ref(),
            "-C".as_ref(),
            image.as_os_str(),
            kib.as_ref(),
        ],
    )?;
    std::fs::set_permissions(image, std::fs::Permissions::from_mode(0o600)).map_err(io(image))?;
    for f in files {
        let name = f
            .file_name()
            .map(|n| format!("::{}", n.to_string_lossy()))
            .unwrap_or_default();
        tool(
            "mcopy",
            &["-i".as_ref(), image.as_os_str(), f.as_os_str(), name.as_ref()],
        )?;
    }
    Ok(())
}
