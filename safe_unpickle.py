"""Reading torch.save files without running what they name.

    names = pickled_globals("BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar")  # nothing runs
    state = load_legacy(path, allowed={"collections.OrderedDict": OrderedDict, ...})

Unpickling calls whatever functions and classes a file names, so a file from elsewhere can run any
code. `pickled_globals` lists those names by reading the pickle opcodes alone, in either of
torch.save's formats: the zip archive (PyTorch 1.6 and later) and the legacy one before it, which
PyTorch 0.4 wrote. `load_legacy` reads a legacy file with an unpickler that resolves the names of an
allow-list and nothing else; torch's own weights_only unpickler cannot read such a file when it
holds whole modules, since it refuses the ('module', class, source) records 0.4 wrote for them.
"""

import io
import pickle
import pickletools
import struct
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from pathlib import Path

import torch

# What torch.save wrote first in its legacy format: a magic number and a format version, each pickled
# with protocol 2 (torch.save's default in every version).
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_FORMAT_VERSION = 1001
LEGACY_HEADER = pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2)
# Pickles of a legacy file after the magic number: format version, sys_info, the object, storage keys.
LEGACY_PICKLES = 4
STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                  "BINUNICODE8"}
# Opcodes that leave the stack as it is, so the two strings STACK_GLOBAL pops are the last two pushed.
STACK_NEUTRAL_OPCODES = {"PROTO", "FRAME", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
ELEMENT_TYPES = {"Float": torch.float32, "Double": torch.float64, "Half": torch.float16,
                 "BFloat16": torch.bfloat16, "Long": torch.int64, "Int": torch.int32, "Short": torch.int16,
                 "Char": torch.int8, "Byte": torch.uint8, "Bool": torch.bool}


class UnreadableFile(ValueError):
    """Not a file torch.save wrote, or a damaged one: the message says which part."""


def is_legacy_file(path):
    """Whether `path` starts as torch.save's legacy format does."""
    with open(path, "rb") as f:
        return f.read(len(LEGACY_HEADER)) == LEGACY_HEADER


def global_name(module, name):
    """The dotted name of a pickled global as Python 3 reads it: protocol 2 writes Python 2's names
    (pickle's fix_imports: __builtin__.dict, commands.Popen), which unpickling maps back."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    return f"{IMPORT_MAPPING.get(module, module)}.{name}"


def globals_in_pickle(file):
    """The dotted names of the globals one pickle in `file` names, read from its opcodes up to STOP.

    A STACK_GLOBAL whose operands are not the two strings pushed just before (what pickle writes)
    is reported as "an unnamed global", so that no name can hide from this scan.
    """
    names, pushed, memo = set(), [], {}
    try:
        for opcode, arg, _ in pickletools.genops(file):
            if opcode.name in ("GLOBAL", "INST"):
                names.add(global_name(*arg.split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL":
                operands = pushed[-2:]
                named = len(operands) == 2 and all(isinstance(s, str) for s in operands)
                names.add(global_name(*operands) if named else "an unnamed global")
            elif opcode.name.startswith("EXT"):  # copyreg's extension registry names globals by number
                names.add(f"extension code {arg}")
            if opcode.name in STRING_OPCODES:
                pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[arg if opcode.name != "MEMOIZE" else len(memo)] = pushed[-1] if pushed else None
            elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif opcode.name not in STACK_NEUTRAL_OPCODES:
                pushed.append(None)
            del pushed[:-2]  # STACK_GLOBAL and the memo need the last two at most
    except ValueError as exc:  # pickletools: an unknown opcode, a truncated argument
        raise UnreadableFile(f"its pickled data is damaged or not a pickle ({exc})") from None
    return names


def pickled_globals(path):
    """The dotted names of every global the pickles of torch.save file `path` name; nothing is run."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            found = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(found) != 1:
                raise UnreadableFile("a zip archive without the one data.pkl torch.save writes")
            return globals_in_pickle(io.BytesIO(archive.read(found[0])))
    if not is_legacy_file(path):
        raise UnreadableFile("neither a zip archive nor torch.save's legacy format")
    names = set()
    with open(path, "rb") as f:
        f.seek(len(LEGACY_HEADER))
        for _ in range(LEGACY_PICKLES):
            names |= globals_in_pickle(f)
    return names


# ----------------------------------------------------------------------------------------------
# Reading a legacy file with an allow-list


class StorageKind:
    """What a storage class such as torch.cuda.FloatStorage stands for when reading: its element type."""

    def __init__(self, dtype):
        self.dtype = dtype


class Storage:
    """A storage being read: a flat tensor (numel,), filled from the file after the pickles."""

    def __init__(self, flat):
        self.flat = flat


def rebuild_tensor(storage, offset, size, stride, requires_grad, backward_hooks, *metadata):
    """torch._utils._rebuild_tensor_v2 for the storages read here: a view of `storage`."""
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not one of the file's")
    flat = storage.flat
    tensor = torch.empty(0, dtype=flat.dtype).set_(flat.untyped_storage(), flat.storage_offset() + offset,
                                                   size, stride)
    return tensor.requires_grad_(bool(requires_grad) and tensor.is_floating_point())


def rebuild_parameter(data, requires_grad, backward_hooks, *state):
    """torch._utils._rebuild_parameter without the hooks a file could carry: a Parameter of `data`."""
    return torch.nn.Parameter(data, bool(requires_grad))


def tensor_globals():
    """What reading tensors needs: storage classes (any device; the tensors come to the CPU), the
    tensor and Parameter rebuilders of torch 0.4 to 1.5, and the containers around them."""
    names = {"collections.OrderedDict": OrderedDict, "builtins.set": set, "builtins.dict": dict,
             "torch._utils._rebuild_tensor_v2": rebuild_tensor,
             "torch.nn.parameter.Parameter": torch.nn.Parameter,  # 0.4: Parameter(tensor, requires_grad)
             "torch._utils._rebuild_parameter": rebuild_parameter}  # 1.0 and later
    for name, dtype in ELEMENT_TYPES.items():
        names[f"torch.{name}Storage"] = names[f"torch.cuda.{name}Storage"] = StorageKind(dtype)
    return names


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in `allowed` and reads torch.save's persistent ids:
    a storage (allocated here on the CPU, filled later) and a module class with its source (the class)."""

    def __init__(self, file, allowed, storages):
        super().__init__(file)
        self.allowed, self.storages = allowed, storages

    def find_class(self, module, name):
        full = global_name(module, name)
        if full not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {full}")
        return self.allowed[full]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            if not any(pid[1] is value for value in self.allowed.values()):
                raise pickle.UnpicklingError("a module record naming no allowed class")
            return pid[1]  # the class; its source was saved to warn of edits, and is not needed here
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], StorageKind) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"a persistent id torch.save does not write ({str(pid)[:80]})")
        _, kind, key, _location, numel, view = pid
        if key not in self.storages:
            self.storages[key] = Storage(torch.empty(numel, dtype=kind.dtype))
        storage = self.storages[key]
        if view is None:
            return storage
        _, offset, view_numel = view  # a view into the root storage, which PyTorch 0.4 could save
        return Storage(storage.flat[offset:offset + view_numel])


def load_legacy(path, allowed):
    """The object a legacy-format torch.save file holds, read with `allowed` ({dotted name: object})
    as the only globals, every tensor on the CPU. Raises UnreadableFile or pickle.UnpicklingError."""
    storages = {}
    with open(path, "rb") as f:
        if f.read(len(LEGACY_HEADER)) != LEGACY_HEADER:
            raise UnreadableFile("not torch.save's legacy format")
        version = AllowListUnpickler(f, {}, storages).load()
        sys_info = AllowListUnpickler(f, {}, storages).load()
        if version != LEGACY_FORMAT_VERSION or not isinstance(sys_info, dict) \
                or sys_info.get("little_endian") is not True:
            raise UnreadableFile(f"legacy format version {version!r} or byte order this reader does not know")
        obj = AllowListUnpickler(f, allowed, storages).load()
        keys = AllowListUnpickler(f, {}, storages).load()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(map(str, storages)):
            raise UnreadableFile("its list of storages differs from the storages its tensors use")
        for key in keys:  # each: the number of elements (int64), then the raw bytes
            flat = storages[key].flat
            header = f.read(8)
            raw = flat.view(torch.uint8).numpy() if flat.numel() else None
            if len(header) != 8 or struct.unpack("<q", header)[0] != flat.numel() \
                    or (raw is not None and f.readinto(memoryview(raw)) != raw.nbytes):
                raise UnreadableFile(f"storage {key} is cut short or of another size than its tensors say")
    return obj
