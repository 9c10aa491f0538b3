//! Which images the fake kubelet runs for real, and how: the repository's `Dockerfile`.
//!
//! An image `kmesh-rs/<stage>[:tag]` is what `docker build --target <stage> -t kmesh-rs/<stage>`
//! makes. From that stage the catalog takes the `ENTRYPOINT`, the `USER`, and each binary the stage
//! copies out of the build stage (`COPY --from=build /src/target/release/<bin> <path>`): the kubelet
//! bind-mounts the workspace's `target/<profile>/<bin>` at `<path>` in the container. So the
//! manifests, the Dockerfile and the binaries are what runs; an image the Dockerfile does not build
//! is an error (as an image pull would be). Every other image is an application image, which the
//! kubelet fakes (see `app_pod`).
use std::{io, path::PathBuf};

/// The image repository prefix of the project's images.
pub const REPOSITORY: &str = "kmesh-rs/";

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
                    let name = match rest.as_slice() {
                        [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                        _ => String::new(),
                    };
                    stages.push(Stage {
                        name,
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
                    if let [from, src, dst] = rest.as_slice()
                        && from.starts_with("--from=")
                        && let Some(bin) = src
                            .strip_prefix("/src/target/release/")
                            .filter(|b| !b.contains('/'))
                    {
                        stage.binaries.push((bin.to_string(), PathBuf::from(dst)));
                    }
                }
                _ => {}
            }
        }
        Ok(Catalog { stages })
    }

    /// The stage building `image`, if it is one of the project's images. An image in the project's
    /// repository that no stage builds is an error.
    pub fn stage_for(&self, image: &str) -> Result<Option<&Stage>, String> {
        let Some(rest) = image.strip_prefix(REPOSITORY) else {
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
    fn stages_give_entrypoint_user_and_binaries() {
        let c = Catalog::parse(
            "FROM rust AS build\nRUN a \\\n  && b\n\nFROM debian AS kmesh-operator\n\
             COPY --from=build /src/target/release/kmesh-operator /usr/local/bin/kmesh-operator\n\
             # a comment\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/kmesh-operator\"]\n",
        )
        .unwrap();
        let s = c
            .stage_for("kmesh-rs/kmesh-operator:latest")
            .unwrap()
            .unwrap();
        assert_eq!(s.entrypoint, ["/usr/local/bin/kmesh-operator"]);
        assert_eq!(s.user.as_deref(), Some("65532:65532"));
        assert_eq!(
            s.binaries,
            [(
                "kmesh-operator".to_string(),
                PathBuf::from("/usr/local/bin/kmesh-operator")
            )]
        );
        assert!(
            c.stage_for("docker.io/curlimages/curl:8")
                .unwrap()
                .is_none()
        );
        let e = c.stage_for("kmesh-rs/kmesh-agent:latest").unwrap_err();
        assert!(e.contains("no stage `kmesh-agent`"), "{e}");
    }

    #[test]
    fn the_repository_builds_both_images() {
        let c = Catalog::from_repository().unwrap();
        for image in [
            "kmesh-rs/kmesh-agent:latest",
            "kmesh-rs/kmesh-operator:latest",
        ] {
            let s = c.stage_for(image).unwrap().unwrap();
            assert_eq!(s.binaries.len(), 1, "{s:?}");
            assert_eq!(s.entrypoint[0], s.binaries[0].1.to_str().unwrap(), "{s:?}");
        }
    }
}
