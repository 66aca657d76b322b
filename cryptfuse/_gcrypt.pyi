"""Types of the libgcrypt extension (cryptfuse/_gcrypt.c)."""

from typing_extensions import Buffer

class Engine:
    """dm-crypt sector encryption with a libgcrypt block cipher."""

    def __init__(
        self,
        algo: str,
        chain: int,
        ivmode: int,
        keys: list[bytes],
        tweak_keys: list[bytes],
        essiv_keys: list[bytes],
        sector_size: int,
        iv_offset: int,
        iv_shift: int,
        extra: Buffer = ...,
    ) -> None: ...
    def crypt(self, src: Buffer, dst: Buffer, first_sector: int, encrypt: bool, /) -> None: ...
    @property
    def c_api(self) -> object: ...

def digest(name: str, data: Buffer, /) -> bytes: ...
def digest_size(name: str, /) -> int: ...
def pbkdf2(
    name: str, password: Buffer, salt: Buffer, iterations: int, length: int, /
) -> bytes: ...
def cipher_info(name: str, key_len: int, /) -> tuple[int, bool] | None: ...
def md5_state(data: Buffer, /) -> bytes: ...
def library_crypt(
    name: str, mode: str, key: Buffer, iv: Buffer, src: Buffer, dst: Buffer, encrypt: bool, /
) -> None: ...
def version() -> str: ...
