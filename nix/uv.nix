# The uv a NixOS builder installs Python dependencies with, laid out as the builder's `[build]
# tools_dir`: <out>/uv-<version>/bin/uv. Elsewhere the builder installs this uv itself, once,
# with the runtime's `python3 -m pip`; a Nix Python has no pip, and a NixOS machine gets its
# programs from its configuration rather than at run time, so the Maestro module hands the
# builder this one instead (a store path the builder only reads).
#
# `version` must be the builder's pinned uv (UV_VERSION in crates/build/src/tools.rs: it is part
# of every dependencies key); scripts/check-nix checks that they agree. The wheels are uv's
# musllinux ones from PyPI, whose binary is statically linked, so it runs on NixOS as it is.
{ pkgs }:
let
  version = "0.13.9";
  wheels = {
    x86_64-linux = {
      url = "https://files.pythonhosted.org/packages/fe/fe/794884de0efd3ac77a427cab21aa72c0483e100c55a42cd5cbb02c141b84/uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl";
      hash = "sha256-LEVTB1FRfWw7vGmhlHP27/5HzOBHvt4B/9ivfqezayU=";
    };
    aarch64-linux = {
      url = "https://files.pythonhosted.org/packages/57/15/94b6cd62ac3ff6550288328e8035288875197cbc183f51554b266a69877b/uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl";
      hash = "sha256-VDXFzhSlZDEgjKCZZBbTEPFZjowsi6cHaImFoWu4Lb4=";
    };
  };
  system = pkgs.stdenv.hostPlatform.system;
  wheel =
    wheels.${system}
      or (throw "platformx: no uv ${version} wheel is pinned for ${system} (nix/uv.nix has ${lib.concatStringsSep ", " (lib.attrNames wheels)})");
  inherit (pkgs) lib;
in
pkgs.runCommand "platformx-build-tools-${version}"
  {
    nativeBuildInputs = [ pkgs.unzip ];
    wheel = pkgs.fetchurl { inherit (wheel) url hash; };
    passthru = { inherit version; };
    meta.description = "uv ${version}, as the Platform.X builder's tools directory";
  }
  ''
    unzip -q "$wheel" 'uv-${version}.data/scripts/uv' -d wheel
    install -D -m 0755 'wheel/uv-${version}.data/scripts/uv' "$out/uv-${version}/bin/uv"
    # The builder runs it as it is: it must be the static binary, not one needing a loader.
    "$out/uv-${version}/bin/uv" --version | grep -qx 'uv ${version}.*'
  ''
