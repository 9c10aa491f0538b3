//! Which images the fake kubelet runs for real, and how: the repository's `Dockerfile`.
//!
//! The project ships one image, `docker.io/kmesh-rs/kmesh-rs:<tag>` (built by `scripts/image.sh`
//! from the `Dockerfile`: static binaries copied into `FROM scratch`); a pod picks its binary with
//! `command`. From the Dockerfile the catalog takes the `ENTRYPOINT`, the `USER`, and each binary
//! it copies (`COPY target/<triple>/release/<bin> ... <dir>/`): the kubelet bind-mounts the
//! workspace's `target/<profile>/<bin>` at `<dir>/<bin>` in the container. So the manifests, the
//! Dockerfile and the binaries are what runs; an image of the project's repository that the
//! Dockerfile does not build is an error (as an image pull would be). The harness's own test
//! images (`kmesh-tests/<bin>`, [`TEST_REPOSITORY`]) run the test instruments the same way: today
//! `kmesh-tests/kmesh-echo`, the L7 tests' HTTP server that answers with its `--version` and what it
//! received. Every other image is an application image, which the kubelet fakes (see `app_pod`).
use std::{io, path::PathBuf};

/// The project's image, without registry and tag (`scripts/image.sh` names it
/// `docker.io/kmesh-rs/kmesh-rs:<version>`).
pub const IMAGE: &str = "kmesh-rs/kmesh-rs";

/// The image repository prefix of the project's images.
pub const REPOSITORY: &str = "kmesh-rs/";

/// The image repository prefix of the harness's test images: `kmesh-tests/<bin>` runs the
/// workspace's test binary `<bin>` (one of [`TEST_BINARIES`]).
pub const TEST_REPOSITORY: &str = "kmesh-tests/";

/// The test binaries a test image may run.
pub const TEST_BINARIES: [&str; 1] = ["kmesh-echo"];

/// What a Dockerfile stage puts in its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub entrypoint: Vec<String>,
    /// `USER` (`uid[:gid]` or a name), if the stage sets one.
    pub user: Option<String>,
    /// (workspace binary name, path in the image).
    pub binaries: Vec<(String, PathBuf)>,
}

#[derive(Clone, Debug)]
pub struct Catalog {
    stages: Vec<Stage>,
}

impl Catalog {
    /// The catalog of the repository's `Dockerfile`.
    pub fn from_repository() -> io::Result<Catalog> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Catalog::parse(&text).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
    }

    pub fn parse(dockerfile: &str) -> Result<Catalog, String> {
        let mut stages: Vec<Stage> = Vec::new();
        for (n, raw) in logical_lines(dockerfile) {
            let mut words = raw.split_whitespace();
            let Some(instruction) = words.next() else {
                continue;
            };
            let rest: Vec<&str> = words.collect();
            match instruction.to_ascii_uppercase().as_str() {
                "FROM" => {
                    // The image is named after the repository, not the stage: one image.
                    stages.push(Stage {
                        name: IMAGE.trim_start_matches(REPOSITORY).to_string(),
                        entrypoint: Vec::new(),
                        user: None,
                        binaries: Vec::new(),
                    });
                }
                "ENTRYPOINT" => {
                    let stage = stages.last_mut().ok_or(format!("line {n}: before FROM"))?;
                    let json = raw.trim_start()[instruction.len()..].trim();
                    stage.entrypoint = serde_json::from_str(json).map_err(|e| {
                        format!("line {n}: ENTRYPOINT must be an exec-form JSON array: {e}")
                    })?;
                }
                "USER" => {
                    let stage = stages.last_mut().ok_or(format!("line {n}: before FROM"))?;
                    stage.user = rest.first().map(|u| u.to_string());
                }
                "COPY" => {
                    let stage = stages.last_mut().ok_or(format!("line {n}: before FROM"))?;
                    copy_binaries(stage, &rest);
                }
                _ => {}
            }
        }
        Ok(Catalog { stages })
    }

    /// The stage building `image`, if it is one of the project's images. An image in the project's
    /// repository that no stage builds is an error.
    pub fn stage_for(&self, image: &str) -> Result<Option<&Stage>, String> {
        let unqualified = image.strip_prefix("docker.io/").unwrap_or(image);
        if let Some(rest) = unqualified.strip_prefix(TEST_REPOSITORY) {
            return test_stage(image, rest).map(Some);
        }
        let Some(rest) = unqualified.strip_prefix(REPOSITORY) else {
            return Ok(None);
        };
        let name = rest.split([':', '@']).next().unwrap_or(rest);
        self.stages
            .iter()
            .find(|s| s.name == name)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "image {image}: the Dockerfile has no stage `{name}` (stages: {})",
                    self.stages
                        .iter()
                        .filter(|s| !s.name.is_empty())
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// The stage of test image `kmesh-tests/<rest>`: its one binary at `/usr/local/bin/<bin>`, its
/// entrypoint, run as the project's image's non-root user (kept in a static, so that the catalog
/// hands out references as for the Dockerfile's stages).
fn test_stage(image: &str, rest: &str) -> Result<&'static Stage, String> {
    use std::sync::OnceLock;
    static STAGES: OnceLock<Vec<Stage>> = OnceLock::new();
    let name = rest.split([':', '@']).next().unwrap_or(rest);
    let stages = STAGES.get_or_init(|| {
        TEST_BINARIES
            .iter()
            .map(|bin| {
                let path = PathBuf::from("/usr/local/bin").join(bin);
                Stage {
                    name: bin.to_string(),
                    entrypoint: vec![path.display().to_string()],
                    user: Some("65532:65532".into()),
                    binaries: vec![(bin.to_string(), path)],
                }
            })
            .collect()
    });
    stages.iter().find(|s| s.name == name).ok_or_else(|| {
        format!(
            "image {image}: no test binary `{name}` (test images: {})",
            TEST_BINARIES.join(", ")
        )
    })
}

/// Records the binaries a `COPY target/<triple>/release/<bin>... <dir>/` (or `<path>` for one
/// source) puts in the image; other copies carry nothing the kubelet needs to map.
fn copy_binaries(stage: &mut Stage, words: &[&str]) {
    let Some((dst, sources)) = words.split_last() else {
        return;
    };
    let bins: Vec<&str> = sources
        .iter()
        .filter(|w| !w.starts_with("--"))
        .filter_map(|src| {
            let (dir, bin) = src.rsplit_once('/')?;
            (dir.starts_with("target/") && dir.ends_with("/release")).then_some(bin)
        })
        .collect();
    for bin in bins {
        let path = if dst.ends_with('/') {
            PathBuf::from(dst).join(bin)
        } else {
            PathBuf::from(dst)
        };
        stage.binaries.push((bin.to_string(), path));
    }
}

/// Lines with `\` continuations joined and comments dropped, with their first line number.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if current.is_empty() {
            if t.starts_with('#') || t.is_empty() {
                continue;
            }
            start = i + 1;
        }
        match t.strip_suffix('\\') {
            Some(body) => {
                current.push_str(body);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                out.push((start, std::mem::take(&mut current)));
            }
        }
    }
    if !current.is_empty() {
        out.push((start, current));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_gives_entrypoint_user_and_binaries() {
        let c = Catalog::parse(
            "FROM scratch\nARG VERSION=unknown\n\
             COPY target/x86_64-unknown-linux-musl/release/kmesh-operator \\\n  \
             target/x86_64-unknown-linux-musl/release/kmesh-agent \\\n  /usr/local/bin/\n\
             # a comment\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/kmesh-operator\"]\n",
        )
        .unwrap();
        let s = c
            .stage_for("docker.io/kmesh-rs/kmesh-rs:0.1.0")
            .unwrap()
            .unwrap();
        assert_eq!(s.entrypoint, ["/usr/local/bin/kmesh-operator"]);
        assert_eq!(s.user.as_deref(), Some("65532:65532"));
        assert_eq!(
            s.binaries,
            [
                (
                    "kmesh-operator".to_string(),
                    PathBuf::from("/usr/local/bin/kmesh-operator")
                ),
                (
                    "kmesh-agent".to_string(),
                    PathBuf::from("/usr/local/bin/kmesh-agent")
                )
            ]
        );
        assert!(c.stage_for("kmesh-rs/kmesh-rs").unwrap().is_some());
        assert!(
            c.stage_for("docker.io/curlimages/curl:8")
                .unwrap()
                .is_none()
        );
        let e = c.stage_for("kmesh-rs/kmesh-agent:latest").unwrap_err();
        assert!(e.contains("no stage `kmesh-agent`"), "{e}");
    }

    #[test]
    fn a_test_image_runs_its_test_binary() {
        let c = Catalog::parse("FROM scratch\n").unwrap();
        let s = c
            .stage_for("docker.io/kmesh-tests/kmesh-echo:test")
            .unwrap()
            .unwrap();
        assert_eq!(s.entrypoint, ["/usr/local/bin/kmesh-echo"]);
        assert_eq!(
            s.binaries,
            [(
                "kmesh-echo".to_string(),
                PathBuf::from("/usr/local/bin/kmesh-echo")
            )]
        );
        let e = c.stage_for("kmesh-tests/kmesh-nothing").unwrap_err();
        assert!(e.contains("no test binary `kmesh-nothing`"), "{e}");
    }

    #[test]
    fn the_repository_image_holds_every_binary_the_manifests_run() {
        let c = Catalog::from_repository().unwrap();
        let s = c
            .stage_for("docker.io/kmesh-rs/kmesh-rs:0.1.0")
            .unwrap()
            .unwrap();
        for bin in [
            "kmesh-operator",
            "kmesh-agent",
            "kmesh-waypoint",
            "kmeshctl",
        ] {
            assert!(
                s.binaries.iter().any(|(b, _)| b == bin),
                "{bin} missing: {s:?}"
            );
        }
        assert!(
            s.binaries
                .iter()
                .any(|(_, path)| path.to_str() == Some(s.entrypoint[0].as_str())),
            "{s:?}"
        );
    }
}
