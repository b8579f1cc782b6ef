"""``anime-keys``: create the CURVE key pairs for workers on other machines.

``init`` makes the server pair (used by the dispatcher and the disk-watcher) and
the directory of authorised client keys; ``client`` makes one pair per worker
machine and authorises it. Both print what to copy where and the config lines
for each side. Secret key files are 0600, key directories 0700.

Layout of KEYS_DIR::

    server.key             server public key: copy to every worker machine
    server.key_secret      server secret key: stays on the server
    authorized/NAME.key    client public keys the server accepts
    clients/NAME.key(_secret)  client pairs: copy the secret one to that worker
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

SERVER = "server"
AUTHORIZED = "authorized"
CLIENTS = "clients"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADDRESS_PLACEHOLDER = "SERVER_ADDRESS"
DISPATCHER_PORT = 5555
DISK_STATE_PORT = 5556


class KeysError(Exception):
    """A user-facing problem; the message is the whole line."""


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _create_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """zmq.auth.create_certificates with the secret file never readable by others."""
    import zmq
    from zmq.auth import create_certificates

    if not zmq.has("curve"):
        raise KeysError("this libzmq was built without CURVE support")
    for path in (directory / f"{name}.key", directory / f"{name}.key_secret"):
        if path.exists():
            raise KeysError(f"{path} already exists; remove it first to make a new pair "
                            "(every machine that has the old key must then get the new one)")
    old_umask = os.umask(0o077)
    try:
        public, secret = create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(public, 0o644)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _endpoint_lines(address: str) -> list[str]:
    return [
        "[zmq]",
        f"dispatcher = {_toml(f'tcp://{address}:{DISPATCHER_PORT}')}",
        f"disk_state = {_toml(f'tcp://{address}:{DISK_STATE_PORT}')}",
    ]


def _address_note(address: str) -> list[str]:
    if address != ADDRESS_PLACEHOLDER:
        return []
    return [f"({ADDRESS_PLACEHOLDER} = the server's LAN address, e.g. 192.168.1.10; "
            "--address fills it in.)"]


def init(keys_dir: Path, address: str) -> str:
    keys_dir = keys_dir.resolve()
    if (keys_dir / f"{SERVER}.key_secret").exists():
        raise KeysError(f"{keys_dir / (SERVER + '.key_secret')} already exists: this directory "
                        "is initialised (add workers with: anime-keys client --dir "
                        f"{keys_dir} --name NAME)")
    _private_dir(keys_dir)
    public, secret = _create_pair(keys_dir, SERVER)
    authorized = keys_dir / AUTHORIZED
    _private_dir(authorized)
    lines = [
        f"Created the server key pair in {keys_dir}:",
        f"  {secret}  secret: stays on this machine, never copy it",
        f"  {public}  public: copy it to every worker machine",
        f"  {authorized}/  the client public keys this server accepts",
        "",
        "On this machine (dispatcher and disk-watcher), add to config.toml:",
        "",
        *_endpoint_lines(address),
        "",
        "[zmq.curve]",
        f"server_secret_key = {_toml(str(secret))}",
        f"authorized_keys_dir = {_toml(str(authorized))}",
        "",
        *_address_note(address),
        "Then, for each worker machine:",
        f"  anime-keys client --dir {keys_dir} --name NAME",
    ]
    return "\n".join(lines) + "\n"


def client(keys_dir: Path, name: str, address: str, remote_dir: str) -> str:
    keys_dir = keys_dir.resolve()
    if not NAME_RE.match(name) or name == SERVER:
        raise KeysError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (not "
                        f"{SERVER!r}), e.g. the worker machine's host name")
    server_public = keys_dir / f"{SERVER}.key"
    authorized = keys_dir / AUTHORIZED
    if not server_public.is_file() or not authorized.is_dir():
        raise KeysError(f"{keys_dir} has no server key pair; run first: "
                        f"anime-keys init --dir {keys_dir}")
    authorized_key = authorized / f"{name}.key"
    if authorized_key.exists():
        raise KeysError(f"{authorized_key} already exists: a client named {name!r} is "
                        "authorised; pick another --name or remove that file first")
    clients = keys_dir / CLIENTS
    _private_dir(clients)
    public, secret = _create_pair(clients, name)
    tmp = authorized / f".{name}.key.tmp"
    shutil.copyfile(public, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, authorized_key)  # the server never sees a half-written key
    remote = remote_dir.rstrip("/") or "/"
    remote_secret = f"{remote}/{secret.name}"
    remote_server = f"{remote}/{server_public.name}"
    lines = [
        f"Created the client key pair {name!r} and authorised it ({authorized_key}).",
        "The dispatcher and the disk-watcher accept it from the next connection, no restart.",
        "",
        f"Copy to the worker machine, into {remote}/ (relative paths in a config file",
        "are relative to that file's directory), keeping the secret private (chmod 600):",
        f"  {secret}  ->  {remote_secret}",
        f"  {server_public}  ->  {remote_server}",
        f"then delete {secret} here.",
        "",
        "On the worker machine, use a copy of the server's config.toml with storage_dir",
        "pointing at the shared storage mount, and these lines:",
        "",
        *_endpoint_lines(address),
        "",
        "[zmq.curve]",
        f"client_secret_key = {_toml(remote_secret)}",
        f"server_public_key = {_toml(remote_server)}",
        "",
        *_address_note(address),
        f"To revoke it later: delete {authorized_key}, then restart the dispatcher and the",
        "disk-watcher to drop a connection that is already open.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anime-keys",
        description="Create the ZeroMQ CURVE keys that let workers on other machines connect "
                    "to the dispatcher and the disk-watcher, and print the config lines for "
                    "each side.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_init = sub.add_parser(
        "init", help="create the server key pair and the authorised-keys directory",
        description="Create KEYS_DIR/server.key (public), KEYS_DIR/server.key_secret and "
                    "KEYS_DIR/authorized/ on the machine that runs the dispatcher and the "
                    "disk-watcher; print the config lines for that machine.")
    p_client = sub.add_parser(
        "client", help="create a worker machine's key pair and authorise it",
        description="Create KEYS_DIR/clients/NAME.key and NAME.key_secret, copy the public "
                    "key into KEYS_DIR/authorized/, and print what to copy to the worker "
                    "machine and the config lines for it.")
    for p in (p_init, p_client):
        p.add_argument("--dir", required=True, type=Path, metavar="KEYS_DIR",
                       help="the key directory on the server machine")
        p.add_argument("--address", default=ADDRESS_PLACEHOLDER,
                       help="the server's address that workers reach, used in the printed "
                            f"endpoints (default: the placeholder {ADDRESS_PLACEHOLDER})")
    p_client.add_argument("--name", required=True,
                          help="a name for the worker machine (letters, digits, . _ -)")
    p_client.add_argument("--remote-dir", default="keys", metavar="DIR",
                          help="where the keys go on the worker machine, as written in its "
                               "config (default: %(default)s, next to its config.toml)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "init":
            text = init(args.dir, args.address)
        else:
            text = client(args.dir, args.name, args.address, args.remote_dir)
    except KeysError as exc:
        print(f"anime-keys: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"anime-keys: {exc.filename or args.dir}: {exc.strerror}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
