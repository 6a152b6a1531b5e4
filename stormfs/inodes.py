"""The daemon's inode table: FUSE inode numbers, names, lookup counts.

Inode numbers are handed out from a counter, never reused within a mount, and
keyed by the backing file's (st_dev, st_ino) so that hard links share one
inode.  An atomic commit gives the backing file a new st_ino; the node is
re-keyed and keeps its number, so the view's inode numbers are stable across
rewrites.

A node knows its names as (parent inode, name) links; its path is found by
walking parents, so renaming a directory needs no update of its descendants.

When another program replaces a name behind the mount, the name is bound to a
new node.  A node that is still open keeps the name as a *shadow* link, so
that its next commit lands there (the last writer wins) instead of being
dropped; an unlink or rename of that name through the mount clears shadows.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

import pyfuse3
import trio

from .content import Identity, Reader
from .working import WorkingCopy

BackingKey = tuple[int, int]
Link = tuple[int, bytes]


@dataclass(eq=False)
class Node:
    inode: int
    key: BackingKey
    mode: int
    links: dict[Link, None] = field(default_factory=dict)  # an ordered set
    lookups: int = 0
    opens: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    reader: Reader | None = None
    working: WorkingCopy | None = None
    # atime/mtime an application set while writes were pending; applied at commit.
    times: tuple[int, int] | None = None
    mtime_ns: int = 0  # of the last write while dirty
    # Backing identity when the kernel's page cache was last known to match it.
    cached: Identity | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def busy(self) -> bool:
        return self.lookups > 0 or self.opens > 0 or self.working is not None


class InodeTable:
    def __init__(self, root: bytes) -> None:
        self.root_path = root
        st = os.lstat(root)
        self.root = Node(pyfuse3.ROOT_INODE, (st.st_dev, st.st_ino), st.st_mode, lookups=1)
        self._nodes: dict[int, Node] = {self.root.inode: self.root}
        self._by_key: dict[BackingKey, Node] = {self.root.key: self.root}
        self._by_link: dict[Link, Node] = {}
        self._shadows: dict[Link, set[Node]] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def __iter__(self):
        return iter(list(self._nodes.values()))

    def get(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def child(self, parent: int, name: bytes) -> Node | None:
        return self._by_link.get((parent, name))

    def path(self, node: Node) -> bytes:
        if node is self.root:
            return self.root_path
        for parent, name in node.links:
            p = self._nodes.get(parent)
            if p is not None:
                return os.path.join(self.path(p), name)
        raise OSError(errno.ENOENT, "no name left")

    def child_path(self, parent: Node, name: bytes) -> bytes:
        return os.path.join(self.path(parent), name)

    def bind(self, parent: int, name: bytes, st: os.stat_result) -> Node:
        """The node for the backing file now found at parent/name."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next, key, st.st_mode)
            self._next += 1
            self._nodes[node.inode] = node
            self._by_key[key] = node
        link = (parent, name)
        previous = self._by_link.get(link)
        if previous is not node:
            if previous is not None:
                del self._by_link[link]
                if previous.opens > 0 or previous.working is not None:
                    self._shadows.setdefault(link, set()).add(previous)
                else:
                    previous.links.pop(link, None)
            node.links[link] = None
            self._by_link[link] = node
        return node

    def unlink(self, parent: int, name: bytes) -> Node | None:
        link = (parent, name)
        for shadow in self._shadows.pop(link, ()):
            shadow.links.pop(link, None)
        node = self._by_link.pop(link, None)
        if node is not None:
            node.links.pop(link, None)
        return node

    def move(self, old: Link, new: Link) -> None:
        node = self._by_link.get(old)
        self.unlink(*old)
        self.unlink(*new)
        if node is not None:
            node.links[new] = None
            self._by_link[new] = node

    def exchange(self, a: Link, b: Link) -> None:
        na, nb = self._by_link.get(a), self._by_link.get(b)
        self.unlink(*a)
        self.unlink(*b)
        for node, new in ((na, b), (nb, a)):
            if node is not None:
                node.links[new] = None
                self._by_link[new] = node

    def rekey(self, node: Node, st: os.stat_result) -> None:
        """The node's content now lives in another backing file (atomic commit)."""
        key = (st.st_dev, st.st_ino)
        if key == node.key:
            return
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = key
        other = self._by_key.get(key)
        if other is None or not other.busy:
            self._by_key[key] = node

    def forget(self, node: Node, n: int) -> None:
        node.lookups = max(0, node.lookups - n)
        self.drop_if_idle(node)

    def drop_if_idle(self, node: Node) -> None:
        if node.busy or node is self.root:
            return
        del self._nodes[node.inode]
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        for link in node.links:
            if self._by_link.get(link) is node:
                del self._by_link[link]
            shadows = self._shadows.get(link)
            if shadows is not None:
                shadows.discard(node)
                if not shadows:
                    del self._shadows[link]
        node.links.clear()
