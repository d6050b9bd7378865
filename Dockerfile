# Platform.X container images: one per service, picked with --target.
#
#   docker build --target apprepo -t platformx/apprepo .
#   docker build --target beacon  -t platformx/beacon .
#   docker build --target maestro -t platformx/maestro .
#   docker build --target init    -t platformx/init .     # compose's one-shot secrets maker
#
# Where the binaries come from is the BINARIES build argument:
# - `build` (the default): the `build` stage compiles the workspace in release mode, once for
#   all images (dependencies in a layer of their own, so a source change rebuilds only the
#   workspace's crates);
# - `prebuilt`: they are taken from dist/bin/ in the build context, as CI does with the
#   binaries `cargo build` already made (scripts/check-images), skipping the Rust toolchain.
# Stages a target does not need are skipped (BuildKit, and buildah's --skip-unused-stages,
# on by default), so `prebuilt` builds never pull the Rust image.
#
# Each service image runs its binary (as PID 1; Maestro's under tini) with a fixed non-root
# uid (apprepo 10001, Beacon 10002, Maestro 10003; images/init-secrets uses the same numbers;
# above the ranges hosts allocate from, so a bind-mounted directory is never shared with a host
# user by accident), reads /etc/platformx/<service>.toml (images/<service>.toml) and its
# secrets from /run/secrets.
# HEALTHCHECK is part of the Docker image format: with buildah or podman, build with
# `--format docker` to keep it. images/README.md says how to run them.
#
# Reproducible: two builds of one commit give the same image ID when given the same
# SOURCE_DATE_EPOCH (the commit's time: `git log -1 --format=%ct`) as a build argument and as
# the image's time (buildah/podman `--timestamp`, BuildKit `rewrite-timestamp=true`;
# images/README.md); with a buildah before 1.41, then normalised by images/normalise-image
# (which removes the build container's ID and host name it writes into the config). For that,
# the base images are pinned by digest, every Debian package an image adds is pinned to a
# version below, and each install removes what would differ between two builds (apt's lists
# and logs, dpkg's and debconf's `-old` copies, ldconfig's aux-cache). scripts/check-images
# builds the Maestro image twice (PX_IMAGES_REPRODUCE=all: every image) and requires the same
# image ID both times.

# Base images, by digest (a tag moves; a digest names one image). Updating: images/README.md.
# rust:1.94.0-bookworm, the multi-architecture index (1.94: the workspace's rust-version).
ARG RUST_IMAGE=docker.io/library/rust@sha256:365468470075493dc4583f47387001854321c5a8583ea9604b297e67f01c5a4f
# debian:bookworm-20260824-slim (Debian 12, the archive as of 2026-08-24), the
# multi-architecture index.
ARG DEBIAN_IMAGE=docker.io/library/debian@sha256:88200866dfff7ea7f5cbcb6ec7c8a701889efe6fe859fe64d6990e4b07ea4171
ARG BINARIES=build

# Debian packages, `name=version`: each image's list names the packages it wants first, then
# every dependency they pull in that the base image lacks, so nothing an image adds floats
# with the mirror (scripts/check-images checks that each list is exactly what its image adds,
# and that a package has one version in all lists). Bookworm's versions (with its -updates and
# -security suites) on 2026-12-07; images/README.md says how to update them.
ARG INIT_PACKAGES="openssl=3.0.22-1~deb12u2 libssl3=3.0.22-1~deb12u2"
ARG APPREPO_PACKAGES="ca-certificates=20250419~deb12u2 openssl=3.0.22-1~deb12u2 \
libssl3=3.0.22-1~deb12u2"
ARG BEACON_PACKAGES="openssl=3.0.22-1~deb12u2 libssl3=3.0.22-1~deb12u2"
ARG MAESTRO_PACKAGES="bubblewrap=0.8.0-2+deb12u1 ca-certificates=20250419~deb12u2 \
python3=3.11.2-1+b1 python3-pip-whl=23.0.1+dfsg-1 tini=0.19.0-1+b3 \
libexpat1=2.5.0-1+deb12u5 libgssapi-krb5-2=1.20.1-2+deb12u5 libk5crypto3=1.20.1-2+deb12u5 \
libkeyutils1=1.6.3-2 libkrb5-3=1.20.1-2+deb12u5 libkrb5support0=1.20.1-2+deb12u5 \
libncursesw6=6.4-4 libnsl2=1.3.0-2 libpython3-stdlib=3.11.2-1+b1 \
libpython3.11-minimal=3.11.2-6+deb12u9 libpython3.11-stdlib=3.11.2-6+deb12u9 \
libreadline8=8.2-1.3 libsqlite3-0=3.40.1-2+deb12u2 libssl3=3.0.22-1~deb12u2 \
libtirpc-common=1.3.3+ds-1 libtirpc3=1.3.3+ds-1 media-types=10.0.0 openssl=3.0.22-1~deb12u2 \
python3-minimal=3.11.2-1+b1 python3.11=3.11.2-6+deb12u9 python3.11-minimal=3.11.2-6+deb12u9 \
readline-common=8.2-1.3"
# A snapshot.debian.org time stamp (`20261207T000000Z`): apt then installs from the archive as
# it was at that time, so an old commit still builds after the mirror has dropped its versions
# (each install below points the base image's debian.sources there). Empty: the base image's
# own sources (the live mirror).
ARG DEBIAN_SNAPSHOT=

# --- Binaries, compiled here ----------------------------------------------------------------
# The workspace's rust-version (Cargo.toml), on the Debian release the runtime images use, so
# the binaries link against the same glibc.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first: the manifests with empty sources build every dependency into a layer that
# only a Cargo.toml or Cargo.lock change invalidates.
COPY Cargo.toml Cargo.lock ./
COPY crates/beacon/Cargo.toml crates/beacon/
COPY crates/bench/Cargo.toml crates/bench/
COPY crates/build/Cargo.toml crates/build/
COPY crates/bundle/Cargo.toml crates/bundle/
COPY crates/e2e/Cargo.toml crates/e2e/
COPY crates/em/Cargo.toml crates/em/
COPY crates/link/Cargo.toml crates/link/
COPY crates/maestro/Cargo.toml crates/maestro/
COPY crates/proto/Cargo.toml crates/proto/
COPY crates/repository/Cargo.toml crates/repository/
COPY crates/runtime/Cargo.toml crates/runtime/
COPY crates/test-support/Cargo.toml crates/test-support/
# A stub lib.rs and main.rs per crate, plus every target path a manifest names (bench's
# src/bin/*.rs), so cargo can load the workspace; the stubs go again before the real sources.
RUN set -eu; \
    for manifest in crates/*/Cargo.toml; do \
      dir=${manifest%/Cargo.toml}; \
      mkdir -p "$dir/src"; \
      : > "$dir/src/lib.rs"; \
      echo 'fn main() {}' > "$dir/src/main.rs"; \
      for path in $(sed -n 's/^path = "\(.*\)"$/\1/p' "$manifest"); do \
        mkdir -p "$dir/$(dirname "$path")"; \
        echo 'fn main() {}' > "$dir/$path"; \
      done; \
    done; \
    cargo build --release --locked -p px-repository -p px-beacon -p px-maestro -p px-em; \
    rm -rf crates/*/src
COPY crates crates
# em embeds the example apps (`em init` templates).
COPY examples examples
# The copied sources keep the build context's modification times, which may be older than the
# stub build: touching them makes cargo rebuild every workspace crate from the real sources.
RUN set -eu; \
    find crates -name '*.rs' -exec touch {} +; \
    cargo build --release --locked -p px-repository -p px-beacon -p px-maestro -p px-em; \
    mkdir /out; \
    for bin in apprepo beacon maestro em; do cp "target/release/$bin" /out/; done

# --- Binaries, built elsewhere ----------------------------------------------------------------
# dist/bin/{apprepo,beacon,maestro} from the build context (scripts/check-images fills a
# temporary context with stripped copies of the binaries cargo built).
FROM scratch AS prebuilt
COPY dist/bin/ /out/

FROM ${BINARIES} AS binaries

# --- init: the cluster's secrets for compose ----------------------------------------------------
# Runs once as root before the services (images/compose.yaml): makes the CA, Beacon's and
# apprepo's keys and certificates, the tokens and the tokens files in /run/secrets, each owned
# by the uid of the service that reads it; keeps whatever already exists.
FROM ${DEBIAN_IMAGE} AS init
ARG INIT_PACKAGES
ARG DEBIAN_SNAPSHOT
ARG SOURCE_DATE_EPOCH
RUN set -eux; \
    if [ -n "$DEBIAN_SNAPSHOT" ]; then \
      sed -i "s|^URIs: .*/\(debian\(-security\)\?\)$|URIs: http://snapshot.debian.org/archive/\1/$DEBIAN_SNAPSHOT|" \
        /etc/apt/sources.list.d/debian.sources; \
      echo 'Acquire::Check-Valid-Until "false";' >/etc/apt/apt.conf.d/snapshot; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $INIT_PACKAGES; \
    rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log \
      /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/cache/ldconfig/aux-cache
COPY images/init-secrets /usr/local/bin/px-init-secrets
ENTRYPOINT ["/usr/local/bin/px-init-secrets"]
CMD ["/run/secrets"]
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://example.invalid/platform-x
LABEL org.opencontainers.image.title="Platform.X compose init" \
      org.opencontainers.image.description="Makes a single-host Platform.X cluster's CA, certificate and tokens" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# --- apprepo ----------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS apprepo
ARG APPREPO_PACKAGES
ARG DEBIAN_SNAPSHOT
ARG SOURCE_DATE_EPOCH
# ca-certificates: with the S3 backend, apprepo verifies the S3 endpoint against the system
# roots. openssl: the HEALTHCHECK's TLS client (ca-certificates depends on it already; named so
# the check does not rest on that). The data directory belongs to the service user (mode 0700,
# as StateDirectory= makes it).
RUN set -eux; \
    if [ -n "$DEBIAN_SNAPSHOT" ]; then \
      sed -i "s|^URIs: .*/\(debian\(-security\)\?\)$|URIs: http://snapshot.debian.org/archive/\1/$DEBIAN_SNAPSHOT|" \
        /etc/apt/sources.list.d/debian.sources; \
      echo 'Acquire::Check-Valid-Until "false";' >/etc/apt/apt.conf.d/snapshot; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $APPREPO_PACKAGES; \
    rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log \
      /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/cache/ldconfig/aux-cache; \
    groupadd --gid 10001 px-apprepo; \
    useradd --no-log-init --uid 10001 --gid px-apprepo --home-dir /var/lib/platformx/apprepo \
      --no-create-home --shell /usr/sbin/nologin px-apprepo; \
    install -d -o px-apprepo -g px-apprepo -m 0700 /var/lib/platformx/apprepo
COPY images/healthcheck /usr/local/bin/px-healthcheck
COPY images/apprepo.toml /etc/platformx/apprepo.toml
COPY --from=binaries /out/apprepo /usr/bin/apprepo
ENV PX_HEALTHCHECK_URL=https://127.0.0.1:7070/healthz
USER 10001:10001
WORKDIR /var/lib/platformx/apprepo
EXPOSE 7070
# apprepo finishes uploads in flight for up to 30 s after SIGTERM: give `docker stop` -t 40.
STOPSIGNAL SIGTERM
# /healthz answers 200 when storage answers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/px-healthcheck"]
# The config file is an argument, so further arguments go after it:
# `docker run IMAGE --check-config`.
ENTRYPOINT ["/usr/bin/apprepo", "--config", "/etc/platformx/apprepo.toml"]
# Labels last: they change with every commit, and nothing after them needs rebuilding.
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://example.invalid/platform-x
LABEL org.opencontainers.image.title="Platform.X apprepo" \
      org.opencontainers.image.description="Receives app bundles, stores them and commits numbered releases" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# --- Beacon -----------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS beacon
ARG BEACON_PACKAGES
ARG DEBIAN_SNAPSHOT
ARG SOURCE_DATE_EPOCH
# Beacon itself needs no package: webhooks verify against roots built into the binary, control
# links and apprepo's API against the cluster CA. openssl is the HEALTHCHECK's TLS client, as
# the API serves HTTPS (images/healthcheck says why it is the simplest one).
RUN set -eux; \
    if [ -n "$DEBIAN_SNAPSHOT" ]; then \
      sed -i "s|^URIs: .*/\(debian\(-security\)\?\)$|URIs: http://snapshot.debian.org/archive/\1/$DEBIAN_SNAPSHOT|" \
        /etc/apt/sources.list.d/debian.sources; \
      echo 'Acquire::Check-Valid-Until "false";' >/etc/apt/apt.conf.d/snapshot; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $BEACON_PACKAGES; \
    rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log \
      /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/cache/ldconfig/aux-cache; \
    groupadd --gid 10002 px-beacon; \
    useradd --no-log-init --uid 10002 --gid px-beacon --home-dir /var/lib/platformx/beacon \
      --no-create-home --shell /usr/sbin/nologin px-beacon; \
    install -d -o px-beacon -g px-beacon -m 0700 /var/lib/platformx/beacon
COPY images/healthcheck /usr/local/bin/px-healthcheck
COPY images/beacon.toml /etc/platformx/beacon.toml
COPY --from=binaries /out/beacon /usr/bin/beacon
ENV PX_HEALTHCHECK_URL=https://127.0.0.1:7080/healthz
# One malloc arena, as systemd/beacon.service sets it: 20 MiB less for 10,000 links.
ENV MALLOC_ARENA_MAX=1
USER 10002:10002
WORKDIR /var/lib/platformx/beacon
# 7080: API and status page (HTTPS); 7443: TLS control links from Maestros and apprepo.
EXPOSE 7080 7443
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/px-healthcheck"]
ENTRYPOINT ["/usr/bin/beacon", "--config", "/etc/platformx/beacon.toml"]
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://example.invalid/platform-x
LABEL org.opencontainers.image.title="Platform.X Beacon" \
      org.opencontainers.image.description="Control plane: tells every Maestro what to run, tracks rollouts, events and alerts" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# --- Maestro ----------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS maestro
ARG MAESTRO_PACKAGES
ARG DEBIAN_SNAPSHOT
ARG SOURCE_DATE_EPOCH
# What apps get: /bin/sh (an app's `run` is `sh -c "<run>"`, and dash is in every Debian
# image), python3 with its standard library (the python examples and `em init --template
# python` need nothing else) and the system CA roots for apps that call out over HTTPS. Other
# runtimes (node, ruby, ...) go into an image derived from this one (images/README.md), or
# into the app's bundle (`bin/`). tini is PID 1: it reaps the orphans an app's processes may
# leave behind, and passes signals on to Maestro, which stops the apps itself.
#
# Builds (images/maestro.toml turns them on): bubblewrap isolates every build command, and
# the runtimes directory holds the image's own Python as
# /opt/platformx/runtimes/python3/<full version>/ (bin/python3.X, lib/python3.X), which builds
# copy into releases. Its files are hard links to Debian's, made in this same layer, so they
# cost the image no space; the interpreter computes its prefix from where it runs, so it runs
# from there with its own standard library (checked below and by scripts/check-images). The
# builder installs its uv with that runtime's `python3 -m pip`: pip comes from Debian's wheel
# of it (python3-pip-whl, 1.7 MB), named by a .pth file in a directory of the runtime that
# builds never copy, so no release carries it.
RUN set -eux; \
    if [ -n "$DEBIAN_SNAPSHOT" ]; then \
      sed -i "s|^URIs: .*/\(debian\(-security\)\?\)$|URIs: http://snapshot.debian.org/archive/\1/$DEBIAN_SNAPSHOT|" \
        /etc/apt/sources.list.d/debian.sources; \
      echo 'Acquire::Check-Valid-Until "false";' >/etc/apt/apt.conf.d/snapshot; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $MAESTRO_PACKAGES; \
    rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log \
      /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/cache/ldconfig/aux-cache; \
    groupadd --gid 10003 px-maestro; \
    useradd --no-log-init --uid 10003 --gid px-maestro --home-dir /var/lib/platformx/maestro \
      --no-create-home --shell /usr/sbin/nologin px-maestro; \
    install -d -o px-maestro -g px-maestro -m 0700 /var/lib/platformx/maestro /var/log/platformx; \
    version=$(python3 -c 'import platform; print(platform.python_version())'); \
    minor=${version%.*}; \
    runtime=/opt/platformx/runtimes/python3/$version; \
    install -d "$runtime/bin" "$runtime/lib/python3/dist-packages"; \
    ln "/usr/bin/python$minor" "$runtime/bin/python$minor"; \
    ln -s "python$minor" "$runtime/bin/python3"; \
    cp -al "/usr/lib/python$minor" "$runtime/lib/"; \
    set -- /usr/share/python-wheels/pip-*.whl; \
    test -f "$1"; \
    echo "$1" >"$runtime/lib/python3/dist-packages/pip.pth"; \
    test "$("$runtime/bin/python3" -I -c 'import sys, ssl, sqlite3; print(sys.prefix)')" = "$runtime"; \
    "$runtime/bin/python3" -m pip --version
COPY images/healthcheck /usr/local/bin/px-healthcheck
COPY images/maestro.toml /etc/platformx/maestro.toml
COPY --from=binaries /out/maestro /usr/bin/maestro
ENV PX_HEALTHCHECK_URL=http://127.0.0.1:7090/healthz
USER 10003:10003
WORKDIR /var/lib/platformx/maestro
# The proxy: plain HTTP on 8080 (an unprivileged port: publish it as 80), HTTPS on 8443 when
# `https_listen` and `certs_dir` are set. The status port (7090) stays on loopback.
EXPOSE 8080 8443
# Maestro drains requests (drain_deadline, 30 s) then stops its apps (stop_grace, 10 s) after
# SIGTERM: give `docker stop` -t 60, as the systemd unit's TimeoutStopSec=.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/px-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/bin/maestro", "--config", "/etc/platformx/maestro.toml"]
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://example.invalid/platform-x
LABEL org.opencontainers.image.title="Platform.X Maestro" \
      org.opencontainers.image.description="Runs app instances, switches releases with zero downtime, proxies HTTP" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
