//! A VM device provisioned the way a real one is: a NoCloud seed ISO with the
//! agent binary, its settings and this architecture's test images, booted on the
//! cached guest image. Shared by `iot-up --vm` and the VM tests, which differ only
//! in the network and the credentials they put into the [`DeviceProvision`].

use std::path::{Path, PathBuf};

use iot_provision::DeviceProvision;

#[cfg(doc)]
use crate::vm::Vm;
use crate::vm::{Arch, GuestImage, VmNet, VmSpec};

/// What to boot, and from what.
pub struct SeededVm<'a> {
    /// Whatever cloud-init is to install; its network's MAC is the VM's.
    pub provision: &'a DeviceProvision,
    /// The agent binary for `arch`.
    pub agent: &'a Path,
    pub arch: Arch,
    /// The VM's own directory (private: the seed holds the enrollment).
    pub dir: PathBuf,
    pub net: VmNet,
    /// A writable FAT seed (as a USB stick or a Pi's boot partition) instead of an
    /// ISO: the install script then removes the enrollment from it.
    pub writable_seed: bool,
}

/// Checks that the agent is built for the VM and writes the seed ISO into the
/// VM's directory: the spec [`Vm::start`] boots. Nothing of the network is made
/// yet, so a caller that must create it (a tap) does so only once this succeeded.
pub fn prepare_seeded_vm(s: SeededVm<'_>) -> anyhow::Result<VmSpec> {
    let built_for = iot_provision::elf_arch(s.agent)?;
    anyhow::ensure!(
        built_for == s.arch.name(),
        "{} is built for {built_for}, the VM is {} (scripts/up.sh --vm --arch {} builds the right one)",
        s.agent.display(),
        s.arch.name(),
        s.arch.name()
    );
    let image = GuestImage::ensure(s.arch)?;
    let mac = s
        .provision
        .network
        .as_ref()
        .map_or_else(|| crate::vm::mac_for(1), |n| n.mac.clone());
    crate::vm::private_dir(&s.dir)?;
    let seed_dir = s.dir.join("seed");
    let files = iot_provision::write_seed_dir(s.provision, s.agent, &[image.test_images()?], &seed_dir)?;
    let seed = if s.writable_seed {
        let img = s.dir.join("seed.img");
        iot_provision::write_seed_vfat(&files, &img)?;
        img
    } else {
        let iso = s.dir.join("seed.iso");
        iot_provision::write_seed_iso(&files, &iso)?;
        iso
    };
    // The plain copy held the enrollment; the image is all the VM needs.
    std::fs::remove_dir_all(&seed_dir)?;
    Ok(VmSpec {
        name: s.provision.device_id.clone(),
        image,
        dir: s.dir,
        seed,
        seed_writable: s.writable_seed,
        net: s.net,
        mac,
        memory_mb: 1024,
        cpus: 2,
    })
}
