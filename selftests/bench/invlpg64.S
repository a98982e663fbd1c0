/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: remap and INVLPG. The guest points a PTE of a table in use at another
 * frame, invalidates the page with INVLPG and reads it. One op = PTE write + INVLPG +
 * read. Prints "invlpg ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set VA, 0x8000000000
	.set TABLES, 0x400000
	.set FRAMES, 0x1000000
	.set NPAGES, 512
	.set N, 4096
_start:
	call	map_private
	call	remap			/* warm */
	call	tsc_start
	call	remap
	mov	rcx, N
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	print_ticks
	jmp	done

/* remap: N times: j = i & 511; PTE[j] = (other frame); INVLPG VA + j * 4K; read it. */
remap:
	xor	ecx, ecx
	movabs	rsi, VA
1:	mov	edx, ecx
	and	edx, 511
	mov	rax, rdx
	shl	rax, 12
	add	rax, FRAMES + 3
	test	ecx, 512		/* bit 9 of i picks the frame: its own, or 2 MiB above */
	jz	2f
	add	rax, 0x200000
2:	mov	[TABLES + 0x3000 + rdx * 8], rax
	shl	edx, 12
	invlpg	[rsi + rdx]
	mov	al, [rsi + rdx]
	inc	ecx
	cmp	ecx, N
	jne	1b
	ret

	.include "tables.inc"
	.include "lib.inc"

	.data
msg:	.asciz	"invlpg"
