/*
 * Test fixture for running the Windows build under Wine: a bcryptprimitives.dll that exports
 * ProcessPrng, which Rust's standard library on Windows imports for its random numbers and which
 * Wine 8's own bcryptprimitives.dll lacks. It fills the buffer from the system CSPRNG through
 * BCryptGenRandom (bcrypt.dll, which Wine implements). Built from this file by scripts/windows-ci
 * with MinGW; never shipped, never used on real Windows (whose DLL has ProcessPrng since Windows 10).
 */
#include <windows.h>
#include <bcrypt.h>

/* As on Windows: BOOL ProcessPrng(PBYTE pbData, SIZE_T cbData), always TRUE there. */
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}
