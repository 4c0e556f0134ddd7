/* What the AMX kernels (gemm_amx.c, attention_cpu.c) share: the tile configuration they all use
 * (palette 1, eight tiles of 16 rows x 64 bytes) and the Linux request for the tiles' register state.
 * Included into each .c file (mllama.kernel_cache hashes local headers into a build's key). */
#ifndef MLLAMA_AMX_H
#define MLLAMA_AMX_H

#include <stdint.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Eight tiles of 16 rows of 64 bytes: 16 x 32 bf16, 16 x 64 int8 or 16 x 16 float32 / int32. */
static inline tile_config amx_config_16x64(void) {
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    return cfg;
}

/* Whether Linux grants this process the tiles' register state (asked once; every thread then has it). */
static inline int amx_permission(void) {
#ifdef __linux__
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;  /* the permission request is Linux's */
#endif
}

#endif
