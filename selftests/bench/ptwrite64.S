/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: a page-table write storm. The guest rewrites the PTEs of a table it is
 * using (entries 0..255 switch between two frames, plain MOV, no INVLPG) and reads
 * through the same table (entries 256..511) in between, as a kernel does when it
 * edits a running process's mappings. One op = one PTE write + one read.
 * Prints "ptwrite ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set VA, 0x8000000000
	.set TABLES, 0x400000
	.set FRAMES, 0x1000000
	.set NPAGES, 512
	.set N, 8192
_start:
	call	map_private
	call	touch_all		/* the table is shadowed and in use */
	call	storm			/* warm */
	call	touch_all
	call	tsc_start
	call	storm
	mov	rcx, N
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	print_ticks
	jmp	done

/* storm: N times: PTE[i & 255] = (other frame), then read page 256 + (i & 255). */
storm:
	xor	ecx, ecx
	movabs	rsi, VA + 256 * 0x1000
1:	mov	edx, ecx
	and	edx, 255
	mov	rax, rdx
	shl	rax, 12
	add	rax, FRAMES + 3
	test	ecx, 256		/* bit 8 of i picks the frame: its own, or 1 MiB above */
	jz	2f
	add	rax, 0x100000
2:	mov	[TABLES + 0x3000 + rdx * 8], rax
	shl	edx, 12
	mov	al, [rsi + rdx]
	inc	ecx
	cmp	ecx, N
	jne	1b
	ret

touch_all:
	movabs	rdi, VA
	mov	ecx, NPAGES
3:	mov	al, [rdi]
	add	rdi, 0x1000
	dec	ecx
	jnz	3b
	ret

	.include "tables.inc"
	.include "lib.inc"

	.data
msg:	.asciz	"ptwrite"
