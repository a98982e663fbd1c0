/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: MOV CR3 round robin among K = 1, 4, 16, 64 address spaces (warm), each
 * switch followed by a read of a page private to that address space. Prints
 * "cr3-kK ticks/op: N" per K. The address spaces share the identity map of the low
 * 4 GiB (PML4 entry 0) and each maps its own page at 512 GiB (PML4 entry 1).
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set PML4S, 0x400000
	.set PDPTS, 0x500000
	.set PDS, 0x600000
	.set PTS, 0x700000
	.set PAGES, 0x800000
	.set PRIVATE, 0x8000000000
	.set SWITCHES, 4096
_start:
	mov	rbx, [0x1000]		/* rvmm-run's PML4 entry 0 */
	xor	ecx, ecx
1:	mov	rax, rcx
	shl	rax, 12
	mov	[PML4S + rax], rbx
	lea	rdx, [PDPTS + rax + 3]
	mov	[PML4S + rax + 8], rdx
	lea	rdx, [PDS + rax + 3]
	mov	[PDPTS + rax], rdx
	lea	rdx, [PTS + rax + 3]
	mov	[PDS + rax], rdx
	lea	rdx, [PAGES + rax + 3]
	mov	[PTS + rax], rdx
	mov	[PAGES + rax], cl	/* each private page holds its index */
	inc	ecx
	cmp	ecx, 64
	jne	1b
	mov	r15, 1
	call	bench
	mov	r15, 4
	call	bench
	mov	r15, 16
	call	bench
	mov	r15, 64
	call	bench
	mov	rax, 0x1000
	mov	cr3, rax
	jmp	done

/* bench(r15 = K): warm once, then SWITCHES switches; prints the ticks per switch. */
bench:
	mov	r14, SWITCHES
	call	round_robin		/* warm: K switches */
	mov	r14, SWITCHES
	call	tsc_start
	call	round_robin
	mov	rcx, SWITCHES
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r15
	call	putdec
	mov	rax, r12
	jmp	print_ticks

/* round_robin: r14 switches over address spaces 0..r15-1, reading each private page. */
round_robin:
	xor	r13, r13
2:	mov	rax, r13
	shl	rax, 12
	add	rax, PML4S
	mov	cr3, rax
	movabs	rax, PRIVATE
	mov	al, [rax]
	inc	r13
	cmp	r13, r15
	jne	3f
	xor	r13, r13
3:	dec	r14
	jnz	2b
	ret

	.include "lib.inc"

	.data
msg:	.asciz	"cr3-k"
