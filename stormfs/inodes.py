"""The daemon's inode table: FUSE inode numbers, names, lookup counts.

Inode numbers are handed out from a counter, never reused within a mount, and
keyed by the backing file's (st_dev, st_ino) so that hard links share one
inode.  An atomic commit gives the backing file a new st_ino; the node is
re-keyed and keeps its number, so the view's inode numbers are stable across
rewrites.

A backing (st_dev, st_ino) names one object only while that object lives: the
file system hands a freed number to the next object it creates.  So a node
stays in the backing-identity index only while it has a name, or while an open
descriptor (its reader) pins the object; a node whose last name is gone is
taken out of the index at once, and an object created through the mount always
gets a fresh node.  A node without a name reaches SOURCE only through the
descriptor it holds, or not at all (ENOENT): never through another object that
inherited its number.

A node knows its names as (parent inode, name) links.  A directory's node
holds an ``O_PATH`` descriptor of its backing directory (opened on first use,
closed when the node goes): names below it are reached through that descriptor,
so no path grows with the depth of the tree, renaming a directory needs no
update of its descendants, and a removed directory's node still reaches that
directory and nothing else.

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

from .openfiles import OpenFile

BackingKey = tuple[int, int]
Link = tuple[int, bytes]


@dataclass(eq=False)
class Node:
    inode: int
    key: BackingKey
    mode: int
    links: dict[Link, None] = field(default_factory=dict)  # an ordered set
    lookups: int = 0
    # Its state in the open-file table (kept with the node: the page-cache identity
    # outlives an open).
    file: OpenFile = field(default_factory=OpenFile)
    # The backing file a lookup found under this node's name since its last open: the
    # open that follows is served that version even if the name has moved on since.
    handed_out: BackingKey | None = None
    # A directory's backing directory, held open (O_PATH) while the node lives.
    fd: int | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def pinned(self) -> bool:
        """An open descriptor holds the backing object, so its number cannot be reused."""
        return self.file.reader is not None or self.fd is not None

    @property
    def busy(self) -> bool:
        f = self.file
        return self.lookups > 0 or f.opens > 0 or f.working is not None


class InodeTable:
    def __init__(self, root_fd: int) -> None:
        """`root_fd`: SOURCE, open (O_PATH is enough); the table closes it."""
        st = os.fstat(root_fd)
        self.root = Node(
            pyfuse3.ROOT_INODE, (st.st_dev, st.st_ino), st.st_mode, lookups=1, fd=root_fd
        )
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

    def name_of(self, node: Node) -> tuple[Node, bytes]:
        """A name the node has now: its parent's node and the name in it."""
        for parent, name in node.links:
            p = self._nodes.get(parent)
            if p is not None:
                return p, name
        raise OSError(errno.ENOENT, "no name left")

    def hold(self, node: Node, fd: int) -> None:
        """Give a directory's node the descriptor of its backing directory."""
        if node.fd is None and self._nodes.get(node.inode) is node:
            node.fd = fd
        else:  # another call was first, or the node is gone
            os.close(fd)

    def close(self) -> None:
        for node in self._nodes.values():
            if node.fd is not None:
                os.close(node.fd)
                node.fd = None

    def bind(self, parent: int, name: bytes, st: os.stat_result, *, created: bool = False) -> Node:
        """The node for the backing object now found at parent/name.

        `created`: the mount has just made this object, so no existing node can
        stand for it (one holding its number is left over from a dead object).
        """
        key = (st.st_dev, st.st_ino)
        link = (parent, name)
        node = None if created else self._by_key.get(key)
        if node is not None and link not in node.links and not _may_be_same(node, st):
            node = None  # the backing inode number was freed and given to another object
        if node is None:
            node = Node(self._next, key, st.st_mode)
            self._next += 1
            self._nodes[node.inode] = node
            self._by_key[key] = node
        previous = self._by_link.get(link)
        if previous is not node:
            if previous is not None:
                del self._by_link[link]
                if previous.file.opens > 0 or previous.file.working is not None:
                    self._shadows.setdefault(link, set()).add(previous)
                else:
                    previous.links.pop(link, None)
                    self._unindex_nameless([previous])
            self._attach(node, link)
        return node

    def unlink(self, parent: int, name: bytes) -> Node | None:
        link = (parent, name)
        losers = list(self._shadows.pop(link, ()))
        node = self._by_link.pop(link, None)
        if node is not None:
            losers.append(node)
        for n in losers:
            n.links.pop(link, None)
        self._unindex_nameless(losers)
        return node

    def move(self, old: Link, new: Link) -> None:
        node = self._by_link.get(old)
        self.unlink(*new)
        if node is not None:
            self._attach(node, new)  # before the old name goes: never nameless meanwhile
        self.unlink(*old)

    def exchange(self, a: Link, b: Link) -> None:
        na, nb = self._by_link.get(a), self._by_link.get(b)
        losers: list[Node] = []
        for link in (a, b):
            for shadow in self._shadows.pop(link, ()):
                shadow.links.pop(link, None)
                losers.append(shadow)
            self._by_link.pop(link, None)
        for node, old in ((na, a), (nb, b)):
            if node is not None:
                node.links.pop(old, None)
        for node, new in ((na, b), (nb, a)):  # after both pops: na may be nb
            if node is not None:
                self._attach(node, new)
        self._unindex_nameless(losers)

    def _attach(self, node: Node, link: Link) -> None:
        node.links[link] = None
        self._by_link[link] = node

    def rekey(self, node: Node, st: os.stat_result, *, created: bool = False) -> None:
        """The node's content now lives in another backing file (`created`: one the
        mount has just made, as an atomic commit does)."""
        key = (st.st_dev, st.st_ino)
        if key == node.key:
            return
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = key
        other = self._by_key.get(key)
        if created or other is None or not other.busy:
            self._by_key[key] = node

    def forget(self, node: Node, n: int) -> None:
        node.lookups = max(0, node.lookups - n)
        self.settle(node)

    def settle(self, node: Node) -> None:
        """After a node lost a lookup, an open or its descriptor: drop it once idle, and
        take it out of the identity index once nothing holds its backing object."""
        if node is self.root:
            return
        if not node.busy and self._nodes.get(node.inode) is node:
            del self._nodes[node.inode]
            for link in node.links:
                if self._by_link.get(link) is node:
                    del self._by_link[link]
                shadows = self._shadows.get(link)
                if shadows is not None:
                    shadows.discard(node)
                    if not shadows:
                        del self._shadows[link]
            node.links.clear()
            if node.fd is not None:
                os.close(node.fd)
                node.fd = None
        self._unindex_nameless([node])

    def _unindex_nameless(self, nodes: list[Node]) -> None:
        """A node with no name left and no descriptor on its object no longer knows
        which object its backing number names: the next one may inherit it."""
        for node in nodes:
            if not node.links and not node.pinned and self._by_key.get(node.key) is node:
                del self._by_key[node.key]


def _may_be_same(node: Node, st: os.stat_result) -> bool:
    """Whether `st`, found under a name `node` does not have yet, can be the object the
    node stands for: the same type, and either held open by the node (its number
    cannot have been reused) or a kind of object that has several names (hard
    links).  Otherwise the node's old names are stale: the object was removed or
    renamed behind the mount and the file system reused its inode number."""
    if stat.S_IFMT(node.mode) != stat.S_IFMT(st.st_mode):
        return False
    return node.pinned or (st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode))
