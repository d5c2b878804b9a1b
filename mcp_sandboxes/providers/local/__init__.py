"""Providers whose sandboxes run on this machine: Docker, Podman, containerd, bubblewrap, and
`process` (no isolation). Their shared helpers: host processes and pipes (_local_process,
_pipes), on-disk sandbox state (_local_state), the sandbox user (_users)."""
