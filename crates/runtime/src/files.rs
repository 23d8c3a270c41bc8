//! File grants: which paths a guest may open.
//!
//! The host grants files (the model file) and directories (a model directory). A guest
//! names a file by an absolute path or by a name relative to a grant (a granted
//! directory, or a granted file's directory). The path is canonicalised (so `..` and
//! symlinks cannot leave a grant) and must be a regular file that is either a granted
//! file or inside a granted directory.
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::RuntimeError;

#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Canonical paths, in the order they were granted.
    entries: Vec<Grant>,
}

#[derive(Clone, Debug)]
enum Grant {
    File(PathBuf),
    Dir(PathBuf),
}

impl Grants {
    /// Canonicalise and add a grant; the path must exist.
    pub fn add(&mut self, path: &Path) -> Result<(), RuntimeError> {
        let canon = path.canonicalize().map_err(|source| RuntimeError::Grant {
            path: path.to_owned(),
            source,
        })?;
        self.entries.push(if canon.is_dir() {
            Grant::Dir(canon)
        } else {
            Grant::File(canon)
        });
        Ok(())
    }

    /// Open `name` for reading if a grant covers it; the error says why not.
    pub fn open(&self, name: &str) -> Result<File, String> {
        if self.entries.is_empty() {
            return Err(format!("file_open({name:?}): the host granted no files to this guest"));
        }
        if name.is_empty() || name.contains('\0') {
            return Err(format!("file_open({name:?}): not a valid path"));
        }
        let requested = Path::new(name);
        let candidates: Vec<PathBuf> = if requested.is_absolute() {
            vec![requested.to_owned()]
        } else {
            self.entries.iter().map(|g| g.base().join(requested)).collect()
        };
        let mut last_reason = None;
        for candidate in candidates {
            let canon = match candidate.canonicalize() {
                Ok(c) => c,
                Err(e) => {
                    last_reason = Some(format!("{}: {e}", candidate.display()));
                    continue;
                }
            };
            if !self.entries.iter().any(|g| g.covers(&canon)) {
                last_reason = Some(format!("{} is outside the paths the host granted", canon.display()));
                continue;
            }
            if !canon.is_file() {
                last_reason = Some(format!("{} is not a regular file", canon.display()));
                continue;
            }
            return File::open(&canon).map_err(|e| format!("file_open({name:?}): {}: {e}", canon.display()));
        }
        Err(format!(
            "file_open({name:?}) refused: {}",
            last_reason.unwrap_or_default()
        ))
    }
}

impl Grant {
    /// Where relative names resolve.
    fn base(&self) -> &Path {
        match self {
            Grant::Dir(d) => d,
            Grant::File(f) => f.parent().unwrap_or(Path::new("/")),
        }
    }

    fn covers(&self, canon: &Path) -> bool {
        match self {
            Grant::File(f) => canon == f,
            Grant::Dir(d) => canon.starts_with(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_enforced() {
        let dir = std::env::temp_dir().join(format!("samepage-grants-{}", std::process::id()));
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("a.bin"), b"a").unwrap();
        std::fs::write(model.join("b.bin"), b"b").unwrap();
        std::fs::write(dir.join("secret"), b"s").unwrap();

        let mut file_grant = Grants::default();
        file_grant.add(&model.join("a.bin")).unwrap();
        assert!(file_grant.open("a.bin").is_ok());
        assert!(file_grant.open(model.join("a.bin").to_str().unwrap()).is_ok());
        assert!(file_grant.open("b.bin").unwrap_err().contains("outside"));
        assert!(file_grant.open("../secret").unwrap_err().contains("outside"));

        let mut dir_grant = Grants::default();
        dir_grant.add(&model).unwrap();
        assert!(dir_grant.open("b.bin").is_ok());
        assert!(dir_grant.open("../secret").unwrap_err().contains("outside"));
        assert!(dir_grant.open("/etc/passwd").unwrap_err().contains("outside"));
        assert!(dir_grant.open(".").unwrap_err().contains("not a regular file"));
        assert!(dir_grant.open("missing").is_err());
        assert!(Grants::default()
            .open("a.bin")
            .unwrap_err()
            .contains("granted no files"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
