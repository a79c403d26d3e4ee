//! Finds the programs the launcher starts. pip installs all three into the same bin/
//! directory, so the launcher's own directory comes first, then PATH.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::LauncherError;

pub const SERVER: &str = "sluice-server";
pub const ROUTER: &str = "sluice-router";

pub struct Binaries {
    pub server: PathBuf,
    pub router: PathBuf,
}

impl Binaries {
    /// Finds both programs up front, so a missing router fails before a long model load.
    pub fn find() -> Result<Self, LauncherError> {
        let launcher_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        let path_var = std::env::var_os("PATH");
        let find = |name| find_binary(name, launcher_dir.as_deref(), path_var.as_deref());
        Ok(Self {
            server: find(SERVER)?,
            router: find(ROUTER)?,
        })
    }
}

/// Looks for an executable `name` in `launcher_dir`, then in each directory of `path_var`.
pub fn find_binary(
    name: &str,
    launcher_dir: Option<&Path>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, LauncherError> {
    let path_dirs = path_var.into_iter().flat_map(std::env::split_paths);
    let searched: Vec<PathBuf> = launcher_dir
        .map(Path::to_path_buf)
        .into_iter()
        .chain(path_dirs)
        .collect();
    searched
        .iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| LauncherError::BinaryNotFound {
            name: name.to_owned(),
            searched,
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn make_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, "#!/bin/sh\n").expect("write file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn prefers_the_launcher_directory() {
        let launcher_dir = tempfile::tempdir().expect("temp dir");
        let path_dir = tempfile::tempdir().expect("temp dir");
        let next_to_launcher = make_file(launcher_dir.path(), SERVER, 0o755);
        make_file(path_dir.path(), SERVER, 0o755);
        let path_var = std::env::join_paths([path_dir.path()]).expect("PATH");
        let found = find_binary(SERVER, Some(launcher_dir.path()), Some(&path_var));
        assert_eq!(found.ok(), Some(next_to_launcher));
    }

    #[test]
    fn falls_back_to_path_skipping_non_executables() {
        let launcher_dir = tempfile::tempdir().expect("temp dir");
        let first = tempfile::tempdir().expect("temp dir");
        let second = tempfile::tempdir().expect("temp dir");
        make_file(first.path(), ROUTER, 0o644);
        let on_path = make_file(second.path(), ROUTER, 0o755);
        let path_var = std::env::join_paths([first.path(), second.path()]).expect("PATH");
        let found = find_binary(ROUTER, Some(launcher_dir.path()), Some(&path_var));
        assert_eq!(found.ok(), Some(on_path));
    }

    #[test]
    fn missing_binary_names_the_places_searched() {
        let launcher_dir = tempfile::tempdir().expect("temp dir");
        let path_dir = tempfile::tempdir().expect("temp dir");
        let path_var = std::env::join_paths([path_dir.path()]).expect("PATH");
        let err = find_binary(SERVER, Some(launcher_dir.path()), Some(&path_var))
            .expect_err("nothing to find");
        let message = err.to_string();
        assert!(message.contains("cannot find `sluice-server`"), "{message}");
        assert!(message.contains(&launcher_dir.path().display().to_string()));
        assert!(message.contains(&path_dir.path().display().to_string()));
    }
}
