"""Providers whose sandboxes run elsewhere: E2B, Daytona, Fly Machines, Vercel Sandbox, Sprites,
Modal, Kubernetes, and Apple `container` (another machine's engine). Their shared helpers: the
vendor HTTP client (_remote_http, _remote_support), shell-level process control in a remote
sandbox (_remote_shell) and output streams (_remote_stream)."""
