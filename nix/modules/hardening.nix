# The sandbox the three services share, as in systemd/*.service: a NixOS `serviceConfig`
# fragment. Each module adds what differs (apprepo and Beacon: ProcSubset=, MemoryDenyWriteExecute=,
# no @resources; Maestro, whose apps share its sandbox: neither, pidfd_getfd for its sockets,
# and a delegated, writable cgroup for its apps' limits).
{
  UMask = "0077";
  NoNewPrivileges = true;
  CapabilityBoundingSet = "";
  AmbientCapabilities = "";
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateMounts = true;
  PrivateDevices = true;
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectClock = true;
  ProtectHostname = true;
  ProtectProc = "invisible";
  RestrictAddressFamilies = [
    "AF_UNIX"
    "AF_INET"
    "AF_INET6"
  ];
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  RemoveIPC = true;
  LockPersonality = true;
  SystemCallArchitectures = "native";
  # A refused system call fails with EPERM, which the caller reports, rather than SIGSYS.
  SystemCallErrorNumber = "EPERM";
}
