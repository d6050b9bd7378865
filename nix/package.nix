# The Platform.X workspace, built once: bin/apprepo, bin/beacon, bin/maestro and bin/em.
{
  lib,
  rustPlatform,
  version,
}:

rustPlatform.buildRustPackage {
  pname = "platformx";
  inherit version;

  # What the build reads: the workspace, and the example apps em embeds (`em init`).
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crates
      ../examples
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "-p"
    "px-repository"
    "-p"
    "px-beacon"
    "-p"
    "px-maestro"
    "-p"
    "px-em"
  ];
  # The test suite runs real services, an S3 server, a browser and Python apps
  # (scripts/test in CI); here the flake's check is the NixOS VM test instead.
  doCheck = false;

  meta = {
    description = "Platform.X, a self-hosted platform-as-a-service";
    homepage = "https://example.invalid/platform-x";
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
    mainProgram = "em";
  };
}
