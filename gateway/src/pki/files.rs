//! Crash-safe files: every write goes to `name.tmp` (created with its final mode), is synced and
//! renamed over `name`, so a crash never leaves half a key; and a warning for key material
//! readable by others.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::PkiError;

/// The file's contents, or `None` if it does not exist.
pub(super) fn read_opt(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `path` atomically with `mode`: a fresh `path.tmp` created with the mode (never a
/// moment with wider permissions), synced, renamed over `path`, then the directory synced.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover from a crash may have another mode; `create_new` below must make it afresh.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

/// Warns when a private file or the directory is readable by group or others. Supplied files
/// are not chmod-ed behind the operator's back.
pub(super) fn warn_if_loose(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "key material is accessible to group or others; chmod it to 0600 (0700 for the directory)"
            );
        }
    }
}
