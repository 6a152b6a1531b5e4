"""A model-based test of the inode table over a backing layer that reuses inode numbers.

`Backing` is a small in-memory file system that, like ext4, gives a freed inode
number to the next object it creates (the smallest free one).  Random steps
drive `InodeTable` the way the operations do (lookup, create, mkdir, link,
unlink, rmdir, rename, exchange, open, commit, close, forget), and after every step the
test checks, against a model of which object each handed-out inode number
stands for, that no inode number ever comes to stand for another object and
that no name reaches one.

`make test` runs a few short seeded runs; `make stress` runs 100,000 steps.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stormfs.inodes import InodeTable, Node

DEV = 0xFA4E  # no real device: keys of the fake never meet the real root's


@dataclass(eq=False)
class Obj:
    ino: int
    mode: int
    ident: int  # the logical object: an atomic commit moves it to a new backing inode
    nlink: int = 1
    pins: int = 0  # open descriptors
    children: dict[bytes, Obj] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def st(self) -> os.stat_result:
        return os.stat_result((self.mode, self.ino, DEV, self.nlink, 0, 0, 0, 0, 0, 0))


class Backing:
    """Directories and regular files; inode numbers are reused smallest-first."""

    def __init__(self) -> None:
        self.root = Obj(1, stat.S_IFDIR | 0o755, 0)
        self.live: dict[int, Obj] = {1: self.root}
        self._idents = 0

    def _new(self, mode: int, ident: int | None = None) -> Obj:
        ino = next(i for i in range(2, len(self.live) + 3) if i not in self.live)
        if ident is None:
            self._idents += 1
            ident = self._idents
        obj = Obj(ino, mode, ident)
        self.live[ino] = obj
        return obj

    def _free_if_gone(self, obj: Obj) -> None:
        if obj.nlink == 0 and obj.pins == 0 and self.live.get(obj.ino) is obj:
            del self.live[obj.ino]

    def make(self, parent: Obj, name: bytes, mode: int) -> Obj:
        obj = self._new(mode)
        parent.children[name] = obj
        return obj

    def link(self, obj: Obj, parent: Obj, name: bytes) -> None:
        obj.nlink += 1
        parent.children[name] = obj

    def remove(self, parent: Obj, name: bytes) -> Obj:
        obj = parent.children.pop(name)
        obj.nlink = 0 if obj.is_dir else obj.nlink - 1
        self._free_if_gone(obj)
        return obj

    def rename(self, sp: Obj, sn: bytes, dp: Obj, dn: bytes) -> None:
        obj = sp.children[sn]
        victim = dp.children.get(dn)
        if victim is obj:
            return
        del sp.children[sn]
        if victim is not None:
            self.remove(dp, dn)
        dp.children[dn] = obj

    def exchange(self, ap: Obj, an: bytes, bp: Obj, bn: bytes) -> None:
        ap.children[an], bp.children[bn] = bp.children[bn], ap.children[an]

    def replace(self, parent: Obj, name: bytes, old: Obj) -> Obj:
        """An atomic commit: a new backing inode carrying the same logical object."""
        new = self._new(old.mode, old.ident)
        parent.children[name] = new
        old.nlink -= 1
        self._free_if_gone(old)
        return new

    def pin(self, obj: Obj) -> None:
        obj.pins += 1

    def unpin(self, obj: Obj) -> None:
        obj.pins -= 1
        self._free_if_gone(obj)


def _descendants(obj: Obj) -> set[int]:
    out = {id(obj)}
    for child in obj.children.values():
        if child.is_dir:
            out |= _descendants(child)
    return out


class Harness:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.rng = rng
        self.root = root
        self.table = InodeTable(os.open(root, os.O_PATH))
        self.fs = Backing()
        self.table.root.key = (DEV, 1)
        self.table._by_key = {(DEV, 1): self.table.root}
        self.stands_for: dict[int, int] = {self.table.root.inode: 0}  # inode -> ident
        self.readers: dict[int, Obj] = {}  # inode -> the backing object its reader holds
        self.handles: list[Node] = []
        self.names = [b"a", b"b", b"c", b"d"]
        # inode -> the directory its descriptor holds (fs.Operations._dir_fd)
        self.held: dict[int, Obj] = {self.table.root.inode: self.fs.root}

    # ---- the model's view ---------------------------------------------------

    def handed(self, node: Node, ident: int) -> None:
        """The kernel got `node` for logical object `ident`: it must stand for it for good."""
        assert self.stands_for.setdefault(node.inode, ident) == ident, (
            f"inode {node.inode} stood for object {self.stands_for[node.inode]}, now {ident}"
        )

    def nodes(self) -> list[Node]:
        return [n for n in self.table if n is not self.table.root]

    def known_dirs(self) -> list[Node]:
        return [self.table.root, *(n for n in self.nodes() if n.is_dir and n.lookups)]

    def dir_obj(self, node: Node) -> Obj:
        """The directory a directory node reaches: by its descriptor, opened through its
        parent's on first use (as fs.Operations._dir_fd does)."""
        if node.inode in self.held:
            return self.held[node.inode]
        parent, name = self.table.name_of(node)
        obj = self.dir_obj(parent).children.get(name)
        if obj is None:
            raise OSError(errno.ENOENT, "no such name")
        if (DEV, obj.ino) != node.key:
            raise OSError(errno.ESTALE, "replaced")
        self.table.hold(node, os.open(self.root, os.O_PATH))
        self.held[node.inode] = obj
        self.fs.pin(obj)
        return obj

    def reach(self, node: Node) -> Obj:
        """The object an operation through `node` reaches by name (fs.Operations._at)."""
        if node.is_dir:
            return self.dir_obj(node)
        parent, name = self.table.name_of(node)
        obj = self.dir_obj(parent).children.get(name)
        if obj is None:
            raise OSError(errno.ENOENT, "no such name")
        return obj

    def where(self, node: Node) -> Obj | None:
        """The backing object an operation through `node` reaches, as fs._target does."""
        try:
            return self.reach(node)
        except OSError:
            return self.readers.get(node.inode)

    def release_dirs(self) -> None:
        """The table closed the descriptors of nodes it dropped."""
        for inode, obj in list(self.held.items()):
            node = self.table._nodes.get(inode)
            if node is None or node.fd is None:
                del self.held[inode]
                self.fs.unpin(obj)

    def check(self) -> None:
        for node in self.nodes():
            ident = self.stands_for[node.inode]
            reached = self.where(node)
            assert reached is None or reached.ident == ident, (
                f"inode {node.inode} (object {ident}) reaches object {reached.ident}"
            )
            if node.inode in self.readers:
                assert self.readers[node.inode].ident == ident
            for parent, name in node.links:
                if parent in self.table._nodes:
                    obj = self.dir_obj(self.table.get(parent)).children[name]
                    assert obj.ident == ident, f"{name!r} in {parent} is another object"
            if node.fd is not None:
                assert self.held[node.inode].ident == ident
        for key, node in self.table._by_key.items():
            assert node.key == key
            obj = self.fs.live.get(key[1])
            assert obj is not None, f"the index keeps inode {node.inode} on a freed number"
            assert obj.ident == self.stands_for[node.inode], (
                f"index: backing {key[1]} is object {obj.ident}, inode {node.inode} "
                f"stands for {self.stands_for[node.inode]}"
            )

    # ---- steps, as the operations take them ---------------------------------

    def _pick_dir(self) -> tuple[Node, Obj] | None:
        node = self.rng.choice(self.known_dirs())
        obj = self.where(node)
        if obj is None or not obj.is_dir or (obj.nlink == 0 and obj is not self.fs.root):
            return None
        return node, obj

    def _pick_entry(self) -> tuple[Node, Obj, bytes, Obj] | None:
        """A known directory, a name, and the object the backing layer has under it."""
        picked = self._pick_dir()
        if picked is None:
            return None
        name = self.rng.choice(self.names)
        obj = picked[1].children.get(name)
        return None if obj is None else (*picked, name, obj)

    def lookup(self) -> None:
        picked = self._pick_entry()
        if picked is None:
            return
        parent, _, name, obj = picked
        node = self.table.bind(parent.inode, name, obj.st())
        node.lookups += 1
        node.handed_out = (DEV, obj.ino)
        self.handed(node, obj.ident)

    def make(self, *, directory: bool) -> None:
        picked = self._pick_dir()
        if picked is None:
            return
        parent, pobj = picked
        name = self.rng.choice(self.names)
        if name in pobj.children:
            return
        mode = stat.S_IFDIR | 0o755 if directory else stat.S_IFREG | 0o644
        obj = self.fs.make(pobj, name, mode)
        node = self.table.bind(parent.inode, name, obj.st(), created=True)
        node.lookups += 1
        self.handed(node, obj.ident)
        if not directory:  # create opens the new file
            self._pin(node, obj)

    def _pin(self, node: Node, obj: Obj) -> None:
        if node.inode not in self.readers:
            self.fs.pin(obj)
            self.readers[node.inode] = obj
            node.file.reader = object()  # type: ignore[assignment]
        node.file.opens += 1
        self.handles.append(node)

    def open(self) -> None:
        files = [n for n in self.nodes() if not n.is_dir and n.lookups]
        if not files:
            return
        node = self.rng.choice(files)
        if node.inode not in self.readers:
            try:
                obj = self.reach(node)
            except OSError:
                return  # ENOENT: no name, no descriptor
            self.table.rekey(node, obj.st())
        else:
            obj = self.readers[node.inode]
        self._pin(node, obj)

    def commit(self) -> None:
        if not self.handles:
            return
        node = self.rng.choice(self.handles)
        try:
            parent, name = self.table.name_of(node)
            pobj = self.dir_obj(parent)
        except OSError:
            return  # unlinked while open: nothing to commit to
        old = self.readers[node.inode]
        if old.nlink > 1:
            return  # rewritten in place: the backing inode stays
        new = self.fs.replace(pobj, name, pobj.children[name])
        self.fs.pin(new)
        self.readers[node.inode] = new
        self.fs.unpin(old)
        self.table.rekey(node, new.st(), created=True)

    def close(self) -> None:
        if not self.handles:
            return
        node = self.handles.pop(self.rng.randrange(len(self.handles)))
        node.file.opens -= 1
        if node.file.opens == 0:
            node.file.reader = None
            self.fs.unpin(self.readers.pop(node.inode))
        self.table.settle(node)

    def remove(self) -> None:
        picked = self._pick_entry()
        if picked is None:
            return
        parent, pobj, name, obj = picked
        if obj.is_dir and obj.children:
            return
        victim = self.table.child(parent.inode, name)
        self.fs.remove(pobj, name)
        self.table.unlink(parent.inode, name)
        if victim is not None:
            self.table.settle(victim)

    def link(self) -> None:
        files = [n for n in self.nodes() if not n.is_dir and n.lookups and n.links]
        picked = self._pick_dir()
        if not files or picked is None:
            return
        node = self.rng.choice(files)
        parent, pobj = picked
        name = self.rng.choice(self.names)
        if name in pobj.children:
            return
        obj = self.reach(node)
        self.fs.link(obj, pobj, name)
        got = self.table.bind(parent.inode, name, obj.st())
        got.lookups += 1
        self.handed(got, obj.ident)

    def rename(self) -> None:
        src, dst = self._pick_dir(), self._pick_dir()
        if src is None or dst is None:
            return
        (sp, spo), (dp, dpo) = src, dst
        sn, dn = self.rng.choice(self.names), self.rng.choice(self.names)
        obj, victim = spo.children.get(sn), dpo.children.get(dn)
        if obj is None or id(dpo) in (_descendants(obj) if obj.is_dir else set()):
            return
        if victim is not None and (victim.is_dir != obj.is_dir or victim.children):
            return
        moved = [n for n in (self.table.child(sp.inode, sn), self.table.child(dp.inode, dn)) if n]
        self.fs.rename(spo, sn, dpo, dn)
        if victim is not obj:
            self.table.move((sp.inode, sn), (dp.inode, dn))
        for node in moved:
            self.table.settle(node)

    def exchange(self) -> None:
        one, two = self._pick_dir(), self._pick_dir()
        if one is None or two is None:
            return
        (ap, apo), (bp, bpo) = one, two
        an, bn = self.rng.choice(self.names), self.rng.choice(self.names)
        a, b = apo.children.get(an), bpo.children.get(bn)
        if a is None or b is None or a.is_dir or b.is_dir:
            return
        moved = [n for n in (self.table.child(ap.inode, an), self.table.child(bp.inode, bn)) if n]
        self.fs.exchange(apo, an, bpo, bn)
        self.table.exchange((ap.inode, an), (bp.inode, bn))
        for node in moved:
            self.table.settle(node)

    def forget(self) -> None:
        nodes = [n for n in self.nodes() if n.lookups]
        if not nodes:
            return
        node = self.rng.choice(nodes)
        n = self.rng.randint(1, node.lookups)
        parents = {p for other in self.nodes() for p, _ in other.links}
        if node.inode in parents:
            n = min(n, node.lookups - 1)  # the kernel keeps a directory while it caches children
        self.table.forget(node, n)

    def step(self) -> None:
        # Closes and forgets grow with what is open and known, so that a long run keeps
        # a working set of the same size (and each check costs the same) throughout.
        ops = (
            (self.lookup, 6),
            (lambda: self.make(directory=True), 3),
            (lambda: self.make(directory=False), 3),
            (self.open, 3),
            (self.commit, 2),
            (self.close, 3 + len(self.handles) // 8),
            (self.remove, 4 + len(self.fs.live) // 40),
            (self.link, 1),
            (self.rename, 2),
            (self.exchange, 1),
            (self.forget, 3 + len(self.table._nodes) // 40),
        )
        fn = self.rng.choices([f for f, _ in ops], weights=[w for _, w in ops])[0]
        fn()
        self.release_dirs()
        self.check()


def run(root: Path, seed: int, steps: int) -> None:
    h = Harness(root, random.Random(seed))
    for _ in range(steps):
        h.step()


@pytest.mark.parametrize("seed", range(4))
def test_inode_numbers_never_change_object(tmp_path: Path, seed: int):
    run(tmp_path, seed, 2000)


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_inode_numbers_never_change_object_long(tmp_path: Path):
    run(tmp_path, 1000, 100_000)
